"""Checkpoints of a training run: save (gathering FSDP shards), find the newest, prune, and resume.

    <run>/warmup/                        the policy after the supervised warm-up (from_pretrained)
    <run>/checkpoints/step-000020/       model.safetensors + config + tokenizer (from_pretrained), trainer_state.pt
                                         (optimizer, scheduler, data cursor, step, ...), rng-rank<r>.pt per rank,
                                         and the text files the trainer hands over (run_config.json, ...)

A checkpoint is written to `step-N.tmp` and renamed once every rank has written its part, so a directory
without `.tmp` that holds trainer_state.pt is complete. Under FSDP2 the model and optimizer states are gathered
into full (unsharded) state dicts on rank 0 and re-sharded on load: the files never depend on the world size.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from model.load import no_library_progress_bars

CKPT_PREFIX = "step-"


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_state(model, fsdp: bool) -> dict | None:
    """Under FSDP the full state dict gathered on rank 0 (every rank must call this); else None (the model's)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_policy(path, model, tokenizer, model_state: dict | None = None, files: dict[str, str] | None = None) -> None:
    """save_pretrained (safetensors) + the tokenizer + `files` ({name: text}). `model_state`: a full state dict
    gathered from shards, or None for the model's own."""
    if model_state is not None and getattr(model.config, "tie_word_embeddings", False):
        # a gathered state dict holds the tied head as a second copy; save it once, as save_pretrained does
        model_state = {k: v for k, v in model_state.items() if k != "lm_head.weight"}
    with no_library_progress_bars():
        model.save_pretrained(path, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(path)
    for name, text in (files or {}).items():
        (Path(path) / name).write_text(text)


def save_checkpoint(run_dir, step: int, model_state: dict | None, model, tokenizer, trainer_state: dict,
                    files: dict[str, str], rank: int, world_size: int, barrier=lambda: None) -> Path:
    """Every rank writes its RNG state; rank 0 writes the rest and renames when all are done.
    `model_state` is a full (unsharded) state dict on rank 0, or None to use model.state_dict()."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_policy(tmp, model, tokenizer, model_state, files)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def save_warmed_up_policy(run_dir, model, tokenizer, fsdp: bool, files: dict[str, str], rank: int,
                          barrier=lambda: None) -> Path:
    """<run>/warmup: the policy after the supervised warm-up (written whole, then renamed)."""
    final = Path(run_dir) / "warmup"
    model_state = full_model_state(model, fsdp)
    if rank == 0:
        tmp = final.with_name("warmup.tmp")
        save_policy(tmp, model, tokenizer, model_state, files)
        os.replace(tmp, final)
    barrier()
    return final


def save_training_checkpoint(run_dir, step: int, model, root, optimizer, scheduler, tokenizer, trainer_state: dict,
                             files: dict[str, str], fsdp: bool, rank: int, world_size: int,
                             barrier=lambda: None) -> Path:
    """Policy + optimizer + scheduler + `trainer_state` (cursor, counters, ...). Under FSDP the model and the
    optimizer state are gathered from the shards of `root` (the fully_shard-ed module) first."""
    model_state, optim_state = full_model_state(model, fsdp), optimizer.state_dict()
    if fsdp:  # the full optimizer state, gathered on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim_state = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                          cpu_offload=True))
    state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), **trainer_state}
    return save_checkpoint(run_dir, step, model_state, model, tokenizer, state, files, rank, world_size, barrier)


def resume_training(path, root, optimizer, scheduler, fsdp: bool, rank: int) -> dict:
    """Restore the optimizer (re-sharded under FSDP), the scheduler and this rank's RNG state from checkpoint
    `path`; return the trainer state (cursor, step, counters, ...)."""
    path = Path(path)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    if fsdp:  # the checkpoint holds the full optimizer state; each rank keeps its shards of it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(root, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=False))
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}


def drop_rows_after(run_dir, step: int, names=("metrics.jsonl", "samples.jsonl")) -> None:
    """Drop what an interrupted run logged after the checkpoint it resumes from, so that no step appears twice
    (warm-up rows stay: the warm-up is not repeated)."""
    for name in names:
        path = Path(run_dir) / name
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows
                                    if r.get("phase") == "warmup" or r.get("step", 0) <= step))


def latest_checkpoint(run_dir) -> Path | None:
    """Newest complete checkpoint (a .tmp one is never complete)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and not p.name.endswith(".tmp") and (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def prune_checkpoints(run_dir, keep_last: int) -> None:
    root = Path(run_dir) / "checkpoints"
    if keep_last <= 0 or not root.is_dir():
        return
    for p in root.iterdir():  # leftovers of a crash mid-write
        if p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    for p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)

"""Checkpoints of a training run: save (gathering FSDP shards), verify, find the newest, prune, and resume.

    <run>/warmup/                   the policy after the supervised warm-up (from_pretrained) + manifest.json
    <run>/evals.json                the evaluations so far (before / after_warmup / after_rl), rewritten as they happen
    <run>/checkpoints/step-000020/  model.safetensors + config + tokenizer (from_pretrained), the text files the
                                    trainer hands over (run_config.json, prompt_format.json), trainer_state.json +
                                    .safetensors (optimizer, scheduler, data cursor, step, evaluations),
                                    rng-rank<r>.json + .safetensors per rank, and manifest.json (written last)

No state is pickled: `save_state` splits a nested state into a JSON skeleton and a safetensors file of its
tensors, so loading a checkpoint parses JSON and reads raw tensors and can never run code. A checkpoint is written
to `step-N.tmp`; once every rank's files are written and fsynced, rank 0 writes manifest.json (size and sha256 of
every file), fsyncs the directory and renames it. A checkpoint counts only if its manifest verifies, so a
truncated or altered file makes `--resume auto` fall back to the previous one. Under FSDP2 the model and optimizer
states are gathered into full (unsharded) state dicts on rank 0 and re-sharded on load: the files never depend on
the world size.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.load import no_library_progress_bars

CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
FAULT_POINT_ENV = "FUNRL_FAULT_POINT"


class CheckpointError(ValueError):
    """A checkpoint that does not verify or cannot be loaded; the message is one line."""


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process here when $FUNRL_FAULT_POINT names this point (crash tests)."""
    if os.environ.get(FAULT_POINT_ENV) == name:
        os.kill(os.getpid(), 9)


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"


# ---------------------------------------------------------------------------------------------------------
# Nested state <-> JSON skeleton + safetensors. Every container is a one-key JSON object naming its type, so
# int vs str dict keys, tuples vs lists and numpy arrays come back exactly; tensors are referenced by name.

def _encode(value, tensors: dict):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        return {"ndarray": [str(value.dtype), value.tolist()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v, tensors) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (tensors, numbers, text, containers)")


def _decode(node, tensors: dict):
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise CheckpointError(f"malformed stored state: an entry with keys {sorted(node)[:3]}")
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "ndarray":
        return np.array(body[1], dtype=np.dtype(body[0]))
    if kind == "list":
        return [_decode(v, tensors) for v in body]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    raise CheckpointError(f"malformed stored state: unknown entry {kind!r}")


def save_state(path_stem, state) -> None:
    """`state` (nested dicts / lists / tuples of numbers, text, tensors, numpy arrays) -> <stem>.json (the
    skeleton) + <stem>.safetensors (the tensors), both fsynced."""
    tensors = {}
    skeleton = _encode(state, tensors)
    stem = Path(path_stem)
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps(skeleton))
    for suffix in (".safetensors", ".json"):
        _fsync(Path(str(stem) + suffix))


def load_state(path_stem):
    """The inverse of save_state; parses JSON and reads raw tensors only (nothing stored can run code)."""
    stem = Path(path_stem)
    try:
        tensors = load_file(str(stem) + ".safetensors")
        return _decode(json.loads(Path(str(stem) + ".json").read_text()), tensors)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {stem.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from None


# ---------------------------------------------------------------------------------------------------------
# Durability and verification: fsync, the manifest (written last), the rename.

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # files and directories alike
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal(tmp: Path, final: Path) -> None:
    """fsync every file of `tmp`, write its manifest (size + sha256 of each file) last, fsync the directory and
    its parent, rename it to `final` (replacing an older one) and fsync the parent again."""
    files = _files(tmp)
    for p in files:
        _fsync(p)
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    _fsync(tmp.parent)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def is_old_format(path) -> bool:
    """A checkpoint of an older version: its trainer state is a pickle, which is refused, never loaded."""
    return (Path(path) / "trainer_state.pt").exists() or any(Path(path).glob("rng-rank*.pt"))


def checkpoint_problem(path) -> str | None:
    """None if `path` is a complete checkpoint (or warm-up policy) whose files match its manifest, else why not."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    if is_old_format(path):
        return "holds pickled state (*.pt) of an older version, which is never loaded: start a new run"
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    if not isinstance(listed, dict):
        return f"unreadable {MANIFEST}"
    present = {str(p.relative_to(path)) for p in _files(path)}
    if present != set(listed):
        return f"files differ from {MANIFEST}: {sorted(present ^ set(listed))[:3]}"
    for name, entry in sorted(listed.items()):
        try:
            size, digest = entry["size"], entry["sha256"]
        except (TypeError, KeyError):
            return f"unreadable {MANIFEST} entry for {name}"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, the manifest says {size}"
        if _sha256(path / name) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


# ---------------------------------------------------------------------------------------------------------
# Saving

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
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
    """Every rank writes its RNG state; rank 0 writes the rest, then the manifest, and renames when all are done.
    `model_state` is a full (unsharded) state dict on rank 0, or None to use model.state_dict()."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_state(tmp / f"rng-rank{rank}", rng_state())
    if rank == 0:
        save_policy(tmp, model, tokenizer, model_state, files)
        fault_point("checkpoint_save")
        save_state(tmp / "trainer_state", trainer_state)
    barrier()
    if rank == 0:
        seal(tmp, final)
    barrier()
    return final


def save_warmed_up_policy(run_dir, model, tokenizer, fsdp: bool, files: dict[str, str], rank: int,
                          barrier=lambda: None) -> Path:
    """<run>/warmup: the policy after the supervised warm-up (written whole, sealed with a manifest, renamed)."""
    final = Path(run_dir) / "warmup"
    model_state = full_model_state(model, fsdp)
    if rank == 0:
        tmp = final.with_name("warmup.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_policy(tmp, model, tokenizer, model_state, files)
        fault_point("warmup_save")
        seal(tmp, final)
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


# ---------------------------------------------------------------------------------------------------------
# Resuming

def resume_training(path, root, optimizer, scheduler, fsdp: bool, rank: int) -> dict:
    """Restore the optimizer (re-sharded under FSDP), the scheduler and this rank's RNG state from checkpoint
    `path` (verified by the caller); return the trainer state (cursor, step, counters, ...)."""
    path = Path(path)
    state = load_state(path / "trainer_state")
    if fsdp:  # the checkpoint holds the full optimizer state; each rank keeps its shards of it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(root, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_state(path / f"rng-rank{rank}"))
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}


def drop_rows_after(run_dir, step: int | None, names=("metrics.jsonl", "samples.jsonl")) -> None:
    """Trim what an interrupted run logged to the state it resumes from, so that no step appears twice: rows of
    RL steps <= `step` and the warm-up rows stay; `step` None (a fresh start) keeps nothing. Summary rows and a
    half-written last line always go."""
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if step is not None and isinstance(row, dict) and row.get("phase") != "summary" and (
                    row.get("phase") == "warmup" or row.get("step", 0) <= step):
                kept.append(line + "\n")
        path.write_text("".join(kept))


def checkpoints_newest_first(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                   and not p.name.endswith(".tmp")), reverse=True)


def latest_checkpoint(run_dir) -> Path | None:
    """Newest checkpoint that verifies against its manifest."""
    return next((p for p in checkpoints_newest_first(run_dir) if checkpoint_problem(p) is None), None)


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

"""Checkpoints hold no pickled state, verify against a manifest, survive kills and corruption; train.py's user
errors are one line. Unit tests on the state format and the manifest, then tiny runs of train.py (tiny_run.py)."""
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import VOLATILE, _args, _final_params, _finish, _run

from model.checkpoint import (MANIFEST, CheckpointError, checkpoint_problem, drop_rows_after, load_state,
                              resume_training, rng_state, save_state, save_training_checkpoint, seal, set_rng_state)


class Bomb:
    """Unpickling this creates the directory `marker`: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _same(a, b) -> bool:
    """Equal values of the same types all the way down (tensors: dtype, shape and bits)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(kb) for k, kb in zip(a, b)) and all(
            _same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _trained_optimizer(tiny_model):
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    ids = torch.randint(0, 200, (2, 6))
    tiny_model.train()
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def test_state_round_trip_is_exact(tmp_path, tiny_model):
    """Optimizer and scheduler state, RNG states and odd values come back with the same types, keys and bits."""
    optimizer, scheduler = _trained_optimizer(tiny_model)
    random.random(), np.random.rand(), torch.rand(1)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "odd": {0: (1, "0"), "0": [None, True, 2.5, float("nan"), 10 ** 30], (1, "a"): {}, 1.5: []},
             "tensors": [torch.tensor(3.0), torch.arange(4, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.int64),
                         torch.zeros(0), torch.tensor([True, False])],
             "cursor": {"epoch": 1, "position": 3}}
    save_state(tmp_path / "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path / "state")
    assert _same(state, back)
    # the restored RNG states continue the same streams
    set_rng_state(back["rng"])
    after = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state["rng"])
    assert after[:2] == (random.random(), np.random.rand()) and torch.equal(after[2], torch.rand(3))
    # and a fresh optimizer loaded from it steps exactly like the original
    twin = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in tiny_model.parameters()], lr=1e-3)
    twin.load_state_dict(back["optimizer"])
    assert _same(twin.state_dict()["state"], optimizer.state_dict()["state"])


def _checkpoint(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    optimizer, scheduler = _trained_optimizer(tiny_model)
    trainer_state = {"cursor": {"epoch": 0, "position": 2}, "step": 1, "skipped_updates": 0,
                     "evals": {"eval/before/val_accuracy": 0.5}}
    return save_training_checkpoint(tmp_path / "run", 1, tiny_model, tiny_model, optimizer, scheduler,
                                    tiny_tokenizer, trainer_state, {"run_config.json": "{}"}, False, 0, 1)


def test_checkpoint_files_manifest_and_resume(tmp_path, tiny_model, tiny_tokenizer):
    ckpt = _checkpoint(tmp_path, tiny_model, tiny_tokenizer)
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "trainer_state.json", "trainer_state.safetensors", "rng-rank0.json",
            "rng-rank0.safetensors", "run_config.json", MANIFEST} <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))], names
    assert not list(ckpt.parent.glob("*.tmp"))
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(listed) == names - {MANIFEST}
    assert checkpoint_problem(ckpt) is None
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    state = resume_training(ckpt, tiny_model, optimizer, scheduler, False, 0)
    assert state == {"cursor": {"epoch": 0, "position": 2}, "step": 1, "skipped_updates": 0,
                     "evals": {"eval/before/val_accuracy": 0.5}}
    assert scheduler.last_epoch == 1 and len(optimizer.state) == len(list(tiny_model.parameters()))


def test_every_truncated_or_altered_file_fails_verification(tmp_path, tiny_model, tiny_tokenizer):
    ckpt = _checkpoint(tmp_path, tiny_model, tiny_tokenizer)
    for name in sorted(p.name for p in ckpt.iterdir()):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(ckpt, broken)
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])
        assert checkpoint_problem(broken), f"truncated {name} verified"
        (broken / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
        assert checkpoint_problem(broken), f"{name} with one bit flipped verified"
        shutil.rmtree(broken)
    (tmp_path / "extra").mkdir()
    shutil.copytree(ckpt, tmp_path / "extra" / "c")
    (tmp_path / "extra" / "c" / "added.json").write_text("{}")
    assert "differ" in checkpoint_problem(tmp_path / "extra" / "c")
    (ckpt / "rng-rank0.json").unlink()
    assert "differ" in checkpoint_problem(ckpt)


def test_drop_rows_after_keeps_exactly_the_state_resumed_from(tmp_path):
    rows = [{"phase": "warmup", "step": 0}, {"phase": "warmup", "step": 1}, {"phase": "rl", "step": 1},
            {"phase": "rl", "step": 2}, {"phase": "eval", "step": 2}, {"phase": "rl", "step": 3},
            {"phase": "summary", "eval/after_rl/val_accuracy": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"phase": "rl", "st'  # killed mid-write
    for step, kept in [(2, rows[:5]), (3, rows[:6]), (0, rows[:2]), (None, [])]:
        (tmp_path / "metrics.jsonl").write_text(text)
        drop_rows_after(tmp_path, step)
        assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == kept, step


LOADED_NAMES = ("trainer_state.json", "trainer_state.safetensors", "rng-rank0.json", "rng-rank0.safetensors")


@pytest.mark.parametrize("name", LOADED_NAMES)
def test_booby_trapped_state_file_never_runs(name, tmp_path, tiny_model, tiny_tokenizer):
    """A pickle whose loading would run code, under each name the loader reads, in a checkpoint whose manifest
    was rewritten to match (a manifest detects damage, not intent): loading fails with a one-line error and the
    code never runs."""
    ckpt = _checkpoint(tmp_path, tiny_model, tiny_tokenizer)
    marker = tmp_path / "marker"
    tmp, trapped = tmp_path / "trapped.tmp", tmp_path / "trapped"
    shutil.copytree(ckpt, tmp)
    (tmp / MANIFEST).unlink()
    payload = io.BytesIO()
    torch.save({"optimizer": Bomb(marker)}, payload)
    (tmp / name).write_bytes(payload.getvalue())
    seal(tmp, trapped)
    assert checkpoint_problem(trapped) is None
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(CheckpointError) as err:
        resume_training(trapped, tiny_model, optimizer, scheduler, False, 0)
    assert "\n" not in str(err.value) and Path(name).stem in str(err.value)
    assert not marker.exists()
    torch.load(io.BytesIO((trapped / name).read_bytes()), weights_only=False)  # armed: unpickling runs it
    assert marker.exists()


@pytest.mark.parametrize("resume", ["path", "auto"])
def test_old_pickled_checkpoint_is_refused_unread(resume, tiny_dir, tiny_data, tmp_path):
    """A checkpoint in the former format (trainer_state.pt, rng-rank0.pt: pickles) is refused with one line;
    neither --resume PATH nor --resume auto unpickles it."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    old = run / "checkpoints" / "step-000001"
    shutil.copytree(tiny_dir, old)
    (old / MANIFEST).unlink(missing_ok=True)
    for name in ("trainer_state.pt", "rng-rank0.pt"):
        torch.save({"step": 1, "optimizer": Bomb(marker)}, old / name)
    (run / "metrics.jsonl").write_text('{"phase": "rl", "step": 1}\n')
    proc = _run(_args(tiny_dir, tiny_data, run, "--steps", "2", "--resume", "auto" if resume == "auto" else str(old)))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not marker.exists(), "the pickled checkpoint was loaded"
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pickled" in lines[0], out[-3000:]
    assert (run / "metrics.jsonl").read_text() == '{"phase": "rl", "step": 1}\n', "the refused run lost its logs"


# ---------------------------------------------------------------------------------------------------------------
# Kills and corruption: a resumed run ends exactly like an uninterrupted one.

COMMON = ("--steps", "3", "--sft-steps", "2", "--save-every", "2", "--keep-last", "5", "--eval-limit", "2")


def _rows(run, phase):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE) and k != "phase"} for r in rows
            if r["phase"] == phase]


def _sample_steps(run):
    return sorted(json.loads(line)["step"] for line in (Path(run) / "samples.jsonl").read_text().splitlines())


def _assert_like(run, reference):
    """Each step logged exactly once, the same rows, samples, summary and final weights as `reference`."""
    for phase in ("warmup", "rl", "eval"):
        got, want = _rows(run, phase), _rows(reference, phase)
        assert [r["step"] for r in got] == [r["step"] for r in want], phase
        for a, b in zip(got, want):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), (phase, a, b)
    assert len(_rows(run, "summary")) == 1
    assert _sample_steps(run) == _sample_steps(reference)
    summary, want = (json.loads((Path(r) / "summary.json").read_text()) for r in (run, reference))
    assert summary == pytest.approx(want) and summary
    assert json.loads((Path(run) / "evals.json").read_text()) == pytest.approx(want)
    got, want = _final_params(run, 3), _final_params(reference, 3)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    _finish(_run(_args(tiny_dir, tiny_data, run, *COMMON)))
    assert [r["step"] for r in _rows(run, "rl")] == [1, 2, 3] and len(_rows(run, "warmup")) == 2
    return run


@pytest.mark.parametrize("point, left", [("warmup_save", "warmup.tmp"),
                                         ("before_checkpoint", "warmup"),
                                         ("checkpoint_save", "checkpoints/step-000002.tmp")])
def test_kill_at_named_point_then_resume_auto_matches_uninterrupted(point, left, uninterrupted, tiny_dir, tiny_data,
                                                                     tmp_path):
    """kill -9 during the warm-up save (nothing to resume: start over), before the first checkpoint and during it
    (resume from warmup/): --resume auto leaves every step logged once and ends like the uninterrupted run."""
    run = tmp_path / "run"
    proc = _run(_args(tiny_dir, tiny_data, run, *COMMON), env={"FUNRL_FAULT_POINT": point})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    assert (run / left).exists() and not (run / "checkpoints" / "step-000002").exists(), sorted(os.listdir(run))
    logged = (run / "metrics.jsonl").read_text()
    assert '"phase": "warmup"' in logged and (point == "warmup_save" or '"phase": "rl"' in logged)
    out = _finish(_run(_args(tiny_dir, tiny_data, run, *COMMON, "--resume", "auto")))
    assert ("continuing from the start" if point == "warmup_save" else "continuing from warmup/") in out
    _assert_like(run, uninterrupted)


@pytest.fixture(scope="module")
def finished(tiny_dir, tiny_data, tmp_path_factory):
    """A finished run with a checkpoint at every step: the reference for the corruption tests."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _finish(_run(_args(tiny_dir, tiny_data, run, *COMMON, "--save-every", "1")))
    return run


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json", "trainer_state.safetensors",
                                  "rng-rank0.json", "rng-rank0.safetensors", MANIFEST, "config.json",
                                  "tokenizer.json"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(name, finished, tiny_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "step-000003"
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2])
    out = _finish(_run(_args(tiny_dir, tiny_data, run, *COMMON, "--save-every", "1", "--resume", "auto")))
    assert "skipping checkpoint step-000003" in out and "resumed from" in out and "step-000002 at step 2" in out, \
        out[-3000:]
    _assert_like(run, finished)


def test_resume_path_that_does_not_verify_is_a_one_line_error(finished, tmp_path):
    import train
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "step-000003"
    (newest / "rng-rank0.safetensors").write_bytes(b"")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as err:
        train.main(["--out-dir", str(run), "--resume", str(newest)])
    message = str(err.value.code)
    assert message.startswith("error: --resume") and "rng-rank0.safetensors" in message and "\n" not in message
    assert (run / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------------------------
# User errors of train.py: one line, no traceback, nothing written.

def _main_error(args) -> str:
    import train
    with pytest.raises(SystemExit) as err:
        train.main(args)
    message = err.value.code
    assert isinstance(message, str) and "\n" not in message.strip(), message
    return message


def test_unreadable_data_is_a_one_line_error(tiny_dir, tiny_data, tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xffnot json at all\n")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text(tiny_data.read_text()[:150])
    cases = {"missing": (tmp_path / "missing.jsonl", "missing.jsonl"), "directory": (tmp_path, str(tmp_path)),
             "garbage": (garbage, "garbage.jsonl"), "truncated": (truncated, "truncated.jsonl")}
    for which in ("--train-data", "--val-data"):
        for case, (path, said) in cases.items():
            args = _args(tiny_dir, tiny_data, tmp_path / f"run-{case}")
            args[args.index(which) + 1] = str(path)
            message = _main_error(args)
            assert message.startswith("error: ") and said in message, (which, case, message)


def test_bad_out_dir_model_and_steps_are_one_line_errors(tiny_dir, tiny_data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    message = _main_error(_args(tiny_dir, tiny_data, a_file / "run"))
    assert message.startswith("error: --out-dir") and "a_file" in message
    for model in (str(tmp_path / "no_such_model_dir"), str(tmp_path), "nobody/no-such-model"):
        args = _args(tiny_dir, tiny_data, tmp_path / "run")
        args[args.index("--model") + 1] = model
        message = _main_error(args)
        assert message.startswith("error: ") and model in message, message
    assert "steps must be >= 0" in _main_error(_args(tiny_dir, tiny_data, tmp_path / "run", "--steps", "-5"))

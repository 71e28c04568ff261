"""Helpers for tests on the tiny model: end-to-end runs of train.py (fixtures tiny_dir / tiny_data: conftest.py),
counting the tokens a model is fed, comparing gradients."""
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time_", "tokens_per_s", "peak_mem_gb", "mem_gb")


def _args(tiny_dir, tiny_data, out, *extra):
    # fp32 rollouts: the exact comparisons below (golden rows, resumes, ranks) then hold on every CPU, whether or
    # not it has native bf16 (--rollout-dtype auto samples in bf16 where it does; test_bf16_rollouts covers that)
    return ["--rollout-dtype", "float32", "--model", str(tiny_dir), "--train-data", str(tiny_data), "--val-data", str(tiny_data),
            "--difficulty", "all", "--out-dir", str(out), "--max-new-tokens", "36", "--group-size", "4",
            "--prompts-per-step", "2", "--eval-limit", "2", "--sft-batch-size", "2", "--lr", "1e-3",
            "--sample-every", "1", "--kl-coef", "0.05", "--reward-mode", "graded", *extra]


def _run(args, nproc=1, env=None, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _rl_rows(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE) and k != "phase"} for r in rows
            if r["phase"] == "rl"]


def _final_params(run, step):
    return load_file(Path(run) / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def count_fed_tokens(model, monkeypatch) -> list[int]:
    """Patch `model`'s class forward to record, per call, the real (unmasked) tokens fed: -> the list it fills."""
    import functools
    fed = []
    forward = type(model).forward

    @functools.wraps(forward)  # keeps the signature (the cache keyword is detected from it)
    def counting_forward(self, *args, **kwargs):
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        fed.append(int(mask[:, -ids.shape[1]:].sum()) if mask is not None else ids.numel())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    return fed


def assert_grad_close(actual, expected, rel=1e-5):
    """A float32 gradient against the same terms summed in another order (or in float64): the worst difference
    against the tensor's largest entry. Entry by entry tolerances fail at random, since a small entry that sums
    large terms which cancel carries the rounding of those terms, not of its own size."""
    scale = expected.abs().max().item()
    worst = (actual - expected).abs().max().item()
    assert worst <= rel * scale, f"gradients differ by {worst:.3g}, over {rel:g} x their largest entry {scale:.3g}"

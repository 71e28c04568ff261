"""train.py end to end on the tiny model: a run writes what it promises, SIGKILL + --resume auto continues
exactly, and two processes under torchrun end a step with the same parameters as one process."""
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import ROOT, VOLATILE, _args, _final_params, _finish, _rl_rows, _run


def _assert_rows_match(a: dict, b: dict, rel=1e-6, abs=1e-7):
    """Same keys; numbers equal to a tolerance (float summation order), everything else exactly."""
    assert a.keys() == b.keys(), (a.keys() ^ b.keys())
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            assert isinstance(y, (int, float)) and not isinstance(y, bool), (key, x, y)
            assert y == pytest.approx(x, rel=rel, abs=abs), (key, x, y)
        else:
            assert x == y, (key, x, y)


def test_run_writes_config_metrics_samples_checkpoint(tiny_dir, tiny_data, tmp_path):
    out = _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "run", "--steps", "2", "--sft-steps", "2",
                             "--save-every", "1", "--keep-last", "1")))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 2 and config["group_size"] == 4
    # the prompt format travels with the run, the warmed-up policy and every checkpoint
    saved = {"answer_format": "think", "tools_as": "python", "prefill": "<think>"}
    for where in (run, run / "warmup", run / "checkpoints" / "step-000002"):
        assert json.loads((where / "prompt_format.json").read_text()) == saved, where
    rows = _rl_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "kl", "cot_entropy", "clip_frac", "grad_norm", "zero_var_frac", "logp_gap_mean", "lr",
                "truncated_frac", "resp_len_mean", "format_error_rate", "bonus", "adv_mean"):
        assert key in rows[0], key
    raw = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.1 < r["mem_gb"] <= r["peak_mem_gb"] for r in raw if r["phase"] == "rl")  # GiB, resident set <= peak
    # fp32 tiny model: the sampler's and the trainer's log-probs are the same distribution
    assert rows[0]["logp_gap_max"] < 1e-3
    assert rows[0]["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and rows[0]["tis_capped_frac"] == 0.0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4 and {"prompt", "completion", "reward", "reason"} <= set(samples[0])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # keep_last 1 pruned step 1
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002")
    summary = json.loads((run / "summary.json").read_text())
    assert {"eval/before/val_accuracy", "eval/after_warmup/val_accuracy", "eval/after_rl/val_accuracy"} <= set(summary)
    assert (run / "plots" / "curves.png").is_file()
    assert "[done]" in out


def test_bf16_rollouts_are_sampled_in_bf16_and_scored_in_fp32(tiny_dir, tiny_data, tmp_path):
    """--rollout-dtype bfloat16 on an fp32 policy: the sampler's log-probs (bf16 matmuls) now differ from the
    trainer's fp32 ones by bf16 rounding, no more; the update still runs and moves the weights."""
    out = _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "run", "--steps", "2", "--sft-steps", "0",
                             "--save-every", "2", "--rollout-dtype", "bfloat16")))
    assert "precision: fp32; rollouts sampled in bfloat16; reference held in bfloat16" in out
    rows = _rl_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    # fp32 rollouts: max gap < 1e-3 (test above); bf16 ones (8-bit mantissas) differ by a few 1e-2 on this model
    gaps = [(r["logp_gap_mean"], r["logp_gap_max"]) for r in rows]
    assert all(mean < 0.05 and 5e-3 < most < 0.5 for mean, most in gaps), gaps
    # the importance weights are the ratios of those log-probs: near 1, but not 1
    assert all(1e-6 < abs(r["tis_weight_mean"] - 1) < 0.1 for r in rows), [r["tis_weight_mean"] for r in rows]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["skipped_updates"] == 0 for r in rows)
    start, end = load_file(tiny_dir / "model.safetensors"), _final_params(tmp_path / "run", 2)
    assert any(not torch.equal(start[n], end[n]) for n in end)
    assert all(t.dtype == torch.float32 for t in end.values())  # the masters stay fp32


def test_eval_before_false_skips_only_the_starting_models_evaluation(tiny_dir, tiny_data, tmp_path):
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "run", "--steps", "0", "--sft-steps", "1",
                       "--eval-before", "false")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) == {"eval/after_warmup/val_accuracy"}
    assert sorted(p.name for p in (tmp_path / "run" / "eval_records").iterdir()) == ["after_warmup.jsonl"]


def test_sigkill_then_resume_matches_uninterrupted(tiny_dir, tiny_data, tmp_path):
    common = ("--steps", "4", "--sft-steps", "2", "--save-every", "1", "--keep-last", "5")
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "full", *common)))
    proc = _run(_args(tiny_dir, tiny_data, tmp_path / "killed", *common), start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-000002").is_dir():
        assert time.time() < deadline and proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "step-000004").exists()
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "killed", *common, "--resume", "auto")))
    full, resumed = _rl_rows(tmp_path / "full"), _rl_rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        _assert_rows_match(a, b)
    pa, pb = _final_params(tmp_path / "full", 4), _final_params(tmp_path / "killed", 4)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    # and the run did change the parameters (the comparison is not vacuous)
    p0 = _final_params(tmp_path / "full", 1)
    assert any(not torch.equal(pa[n], p0[n]) for n in pa)


def test_two_processes_match_one(tiny_dir, tiny_data, tmp_path):
    common = ("--steps", "1", "--sft-steps", "0", "--save-every", "1", "--prompts-per-step", "2")
    one = _run(_args(tiny_dir, tiny_data, tmp_path / "one", *common))
    _finish(one)
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "two", *common), nproc=2))
    from model.checkpoint import load_state
    # The same gradients: after one AdamW step exp_avg = (1 - beta1) * the (clipped) gradient. One process scores
    # both groups after their common prefix, each rank its one group whole, so they differ by float rounding only.
    m1, m2 = ({i: s["exp_avg"] for i, s in load_state(tmp_path / run / "checkpoints" / "step-000001" /
                                                       "trainer_state")["optimizer"]["state"].items()}
              for run in ("one", "two"))
    # (summed in other orders: entries ~1e-6 of the largest can differ by a few 1e-9)
    assert m1.keys() == m2.keys() and m1
    for i in m1:
        torch.testing.assert_close(m2[i], m1[i], rtol=1e-4, atol=5e-6 * float(m1[i].abs().max()) + 1e-12)
    # The same step. Adam's first step moves a weight by lr * g / (|g| + eps): where |g| is a few eps or less
    # (the weight moved less than 0.9 lr), the rounding of g decides the move (even its sign), so there the two may
    # differ by up to two steps; everywhere else by 2% of a step (lr 1e-3).
    lr = 1e-3
    p1, p2 = _final_params(tmp_path / "one", 1), _final_params(tmp_path / "two", 1)
    start = load_file(tiny_dir / "model.safetensors")
    changed, sensitive, total = False, 0, 0
    for name in p1:
        near_eps = ((p1[name] - start[name]).abs() < 0.9 * lr) | ((p2[name] - start[name]).abs() < 0.9 * lr)
        torch.testing.assert_close(p2[name][~near_eps], p1[name][~near_eps], rtol=0, atol=2e-5, msg=name)
        assert float((p2[name] - p1[name]).abs().max()) <= 2 * lr, name
        changed |= not torch.equal(p1[name], start[name])
        sensitive, total = sensitive + int(near_eps.sum()), total + near_eps.numel()
    assert changed, "the step did not update the parameters: the comparison would be vacuous"
    assert sensitive < 0.5 * total, f"{sensitive} of {total} weights near eps: the comparison would be vacuous"
    r1, r2 = _rl_rows(tmp_path / "one")[0], _rl_rows(tmp_path / "two")[0]
    assert r1["reward"] == pytest.approx(r2["reward"]) and r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
    # each rank evaluated its shard; rank 0 wrote every record's verdict, consistent with the summary
    from eval.bfcl import read_verdicts
    for run in ("one", "two"):
        verdicts = read_verdicts(tmp_path / run / "eval_records" / "after_rl.jsonl")
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert sorted(v.id for v in verdicts) == ["r0", "r1"]
        assert summary["eval/after_rl/val_accuracy"] == sum(v.correct for v in verdicts) / 2


def test_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"phase": "rl", "step": 1}\n')
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out-dir", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode != 0 and "--resume auto" in res.stderr
    assert (run / "metrics.jsonl").read_text() == '{"phase": "rl", "step": 1}\n'


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_non_finite_update_is_skipped_counted_and_training_goes_on(where, tiny_dir, tiny_data, tmp_path, monkeypatch,
                                                                   capsys):
    """The first update's loss (or gradient norm) is made NaN: that update is skipped and counted, the parameters
    stay as they were, and the next step trains normally. In-process, so the fault can be injected."""
    import rl.update
    import train
    calls = {"n": 0}
    if where == "loss":
        real = rl.update.aggregate

        def faulty(*a, **kw):
            calls["n"] += 1
            out = real(*a, **kw)
            return out * float("nan") if calls["n"] == 1 else out
        monkeypatch.setattr(rl.update, "aggregate", faulty)
    else:
        real = torch.nn.utils.clip_grad_norm_

        def faulty(*a, **kw):
            calls["n"] += 1
            norm = real(*a, **kw)
            return norm * float("inf") if calls["n"] == 1 else norm
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", faulty)
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(_args(tiny_dir, tiny_data, run, "--steps", "2", "--sft-steps", "0", "--save-every", "1",
                         "--eval-limit", "0"))
    # the schedule advances with the steps whether or not their update was made: no warning about the order
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    assert calls["n"] >= 2
    assert f"non-finite {'loss' if where == 'loss' else 'gradient norm'}, update skipped" in capsys.readouterr().out
    rows = _rl_rows(run)
    assert [r["skipped_updates"] for r in rows] == [1, 1]
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]) for r in rows)
    start, p1, p2 = load_file(tiny_dir / "model.safetensors"), _final_params(run, 1), _final_params(run, 2)
    assert all(torch.equal(start[n], p1[n]) for n in start), "the skipped update changed the parameters"
    assert any(not torch.equal(p1[n], p2[n]) for n in p1), "training did not go on after the skipped update"


def test_fsdp_two_processes_match_one_and_resume(tiny_dir, tiny_data, tmp_path):
    """--fsdp (FSDP2 fully_shard) over 2 CPU processes (gloo): warm-up, evaluation and one GRPO step end with the
    same parameters as in one plain process, and the saved policies are full ones like its; a run stopped after
    step 1 and resumed from its checkpoint (optimizer state re-sharded) ends step 2 exactly like an uninterrupted
    FSDP run."""
    common = ("--save-every", "1", "--prompts-per-step", "2", "--sft-steps", "2", "--eval-limit", "2")
    # FSDP scores every sequence whole (no shared prompt cache), so the plain run does too: the same float rounding,
    # which Adam would otherwise amplify for gradients near its eps
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "one", *common, "--steps", "1", "--share-prompt-kv", "false")))
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "fsdp", *common, "--steps", "2", "--fsdp", "true"), nproc=2))
    p1, p2 = _final_params(tmp_path / "one", 1), _final_params(tmp_path / "fsdp", 1)
    start = load_file(tiny_dir / "model.safetensors")
    w1, w2 = (load_file(tmp_path / run / "warmup" / "model.safetensors") for run in ("one", "fsdp"))
    assert set(w1) == set(w2) and all(torch.allclose(w1[n], w2[n], rtol=1e-4, atol=1e-6) for n in w1)
    assert set(p1) == set(p2)
    # Adam turns float-order noise in near-zero gradients into update noise of ~1e-5; a parameter the sharded
    # optimizer missed, or another batch, would be off by about the learning rate (1e-3)
    for name in p1:
        assert torch.allclose(p1[name], p2[name], rtol=1e-4, atol=1e-4), name
    assert any((p1[n] - start[n]).abs().max() > 1e-3 for n in p1), "the step did not update the parameters"

    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "part", *common, "--steps", "1", "--fsdp", "true"), nproc=2))
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "part", *common, "--steps", "2", "--fsdp", "true",
                       "--resume", "auto"), nproc=2))
    full, resumed = _final_params(tmp_path / "fsdp", 2), _final_params(tmp_path / "part", 2)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert any(not torch.equal(full[n], p2[n]) for n in full), "step 2 did not update the parameters"


GOLDEN = Path(__file__).with_name("golden_train.json")
GOLDEN_RUNS = {
    # warm-up, learning-rate warm-up and cosine schedule, KL reference, entropy bonus, dynamic sampling with
    # refills, two PPO epochs of two minibatches (the old-log-prob path)
    "minibatches": ("--steps", "3", "--sft-steps", "2", "--warmup-steps", "2", "--lr-schedule", "cosine",
                    "--ppo-epochs", "2", "--minibatches", "2", "--dynamic-sampling", "--max-refill-rounds", "4",
                    "--save-every", "3", "--eval-limit", "2"),
    # the default update (on-policy: one PPO epoch, one minibatch), an evaluation between steps, pruning
    "on_policy": ("--steps", "3", "--sft-steps", "2", "--eval-every", "2", "--save-every", "1", "--keep-last", "1",
                  "--eval-limit", "2"),
}


def _golden_facts(run):
    """What must not change when the code is reorganised: every metrics row without its timings and memory, the
    failure reasons per step under their full codes (from samples.jsonl, which holds every completion), and a
    digest of every tensor of the final checkpoint (parameters and optimizer state)."""
    import hashlib
    run = Path(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]
    logged_reasons = [{k: v for k, v in r.items() if k.startswith("reason/")} for r in rows]
    rows = [{k: v for k, v in r.items() if not k.startswith("reason/")} for r in rows]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        if row["phase"] == "rl":
            whys = [s["reason"] for s in samples if s["step"] == row["step"]]
            codes = [w.split(": ")[0] if w else "correct" for w in whys]
            row.update({f"reason/{c}": codes.count(c) / len(codes) for c in sorted(set(codes))})
    ckpt = run / "checkpoints" / "step-000003"
    params = {name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
              for name, t in sorted(load_file(ckpt / "model.safetensors").items())}
    from model.checkpoint import load_state
    optim = load_state(ckpt / "trainer_state")["optimizer"]["state"]
    optim_sums = {f"{i}/{k}": float(v.double().sum()) for i, s in sorted(optim.items()) for k, v in sorted(s.items())}
    return {"rows": rows, "params_sha256": params, "optimizer_sums": optim_sums, "cpu": _cpu_kind()}, logged_reasons


def _cpu_kind() -> str:
    """What decides the float rounding of a CPU run: MKL and torch pick their kernels by instruction set and vendor
    (AVX2 or AVX-512 code sums in other orders)."""
    vendor = "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "?")
    return f"{platform.machine()} {vendor} {torch.backends.cpu.get_cpu_capability()}"


# Metrics computed in floating point from the model's outputs (the rest are counts, rewards, verdicts, lengths)
CONTINUOUS = ("adv_", "bonus", "clip_frac", "cot_entropy", "grad_norm", "kl", "logp_gap", "loss", "sft_nll", "tis_")


@pytest.mark.parametrize("name", sorted(GOLDEN_RUNS))
def test_golden_run_is_unchanged(name, tiny_dir, tiny_data, tmp_path):
    """A 3-step run gives exactly the metrics and final tensors recorded before the code was reorganised
    (tests/golden_train.json), and its rows count the failure reasons under their full codes. Exactly on the kind of
    CPU the run was recorded on; on another kind (other kernels, other rounding), the discrete outcomes (rewards,
    verdicts, lengths, counts) exactly and the float metrics within 5% (measured across kinds: at most 2%)."""
    run = tmp_path / "run"
    _finish(_run(_args(tiny_dir, tiny_data, run, *GOLDEN_RUNS[name])))
    facts, logged_reasons = _golden_facts(run)
    golden = json.loads(GOLDEN.read_text())
    if os.environ.get("FUNRL_RECORD_GOLDEN") == name:  # deliberate re-recording after a change of behaviour
        GOLDEN.write_text(json.dumps({**golden, name: facts}, indent=1, sort_keys=True) + "\n")
        return
    want = golden[name]
    same_cpu = facts["cpu"] == want["cpu"]
    assert len(facts["rows"]) == len(want["rows"])
    for got, expected, logged in zip(facts["rows"], want["rows"], logged_reasons):
        if same_cpu:
            assert got == expected
        else:
            assert got.keys() == expected.keys()
            for key, value in got.items():
                if key.startswith(CONTINUOUS):
                    assert value == pytest.approx(expected[key], rel=0.05, abs=1e-4), (got["step"], key)
                else:
                    assert value == expected[key], (got["step"], key)
        assert logged == {k: v for k, v in got.items() if k.startswith("reason/")}
    if same_cpu:
        assert facts["params_sha256"] == want["params_sha256"]
        assert facts["optimizer_sums"] == want["optimizer_sums"]


# ---------------------------------------------------------------------------------------------------------------
# The GPU recipe's paths, exercised on CPU: mixed precision, NCCL-safe collectives, FSDP with ranks that finish
# generation at different times, micro-batches with gradient accumulation, FSDP in one process.

def _moved_fraction(start: dict, end: dict) -> float:
    moved = sum(int((end[n].float() != start[n].float()).sum()) for n in start)
    return moved / sum(t.numel() for t in start.values())


def test_bf16_mixed_precision_keeps_fp32_masters_that_move_at_lr_1e_6(tiny_dir, tiny_data, tmp_path):
    """An Adam step at lr 1e-6 is far below half the spacing of bf16 weights (~1e-4 near 0.02): pure bf16
    training rounds it away. With fp32 master weights under bf16 compute, as many weights move as in fp32."""
    common = ("--steps", "2", "--sft-steps", "0", "--eval-limit", "0", "--save-every", "1", "--lr", "1e-6")
    for dtype in ("float32", "bfloat16"):
        out = _finish(_run(_args(tiny_dir, tiny_data, tmp_path / dtype, *common, "--dtype", dtype)))
        if dtype == "bfloat16":
            assert "precision: bfloat16 compute, fp32 master weights (autocast)" in out
    start = load_file(tiny_dir / "model.safetensors")
    fp32, bf16 = _final_params(tmp_path / "float32", 2), _final_params(tmp_path / "bfloat16", 2)
    assert all(t.dtype == torch.float32 for t in bf16.values()), "the checkpoint must hold the fp32 masters"
    fp32_moved, bf16_moved = _moved_fraction(start, fp32), _moved_fraction(start, bf16)
    assert fp32_moved > 0.5, fp32_moved
    assert bf16_moved > 0.9 * fp32_moved, (bf16_moved, fp32_moved)


SPY = '''
import sys
import torch
import torch.distributed as dist
from rl.dist import process_group_backend

# The process group the trainer makes on CUDA, and the tensor devices it can serve ("nccl" alone: CUDA only).
backend = process_group_backend(torch.device("cuda"))
served = {pair.split(":")[0] for pair in backend.split(",")} if ":" in backend else {"cuda"}
seen = []

def spy(name):
    real = getattr(dist, name)
    def collective(*args, **kwargs):
        for arg in list(args) + list(kwargs.values()):
            for t in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(t, torch.Tensor):
                    seen.append(name)
                    if t.device.type not in served:
                        raise RuntimeError(f"{name} got a {t.device.type} tensor, which the CUDA process group "
                                           f"({backend}) cannot serve")
        return real(*args, **kwargs)
    setattr(dist, name, collective)

for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce"):
    spy(name)
import train
train.main(sys.argv[1:])
assert len(seen) > 10, seen
print("collectives seen:", len(seen))
'''


def test_every_collective_is_served_by_the_cuda_process_group(tiny_dir, tiny_data, tmp_path):
    """NCCL serves CUDA tensors only, and the trainer's counts and metrics are CPU tensors. Two gloo processes run
    the warm-up, evaluation, dynamic sampling and a GRPO step with every collective spied on: each tensor must be of
    a device the process group made on CUDA can serve."""
    script = tmp_path / "spy_train.py"
    script.write_text(SPY)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *_args(tiny_dir, tiny_data, tmp_path / "run", "--steps", "1", "--sft-steps", "1", "--eval-limit", "3",
                  "--dynamic-sampling", "--micro-batch-tokens", "80")]
    out = _finish(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True))
    assert "collectives seen:" in out


def test_fsdp_ranks_with_unequal_generation_and_micro_batches_match_one_process(tiny_dir, tiny_data, tmp_path):
    """Under FSDP every sharded forward is a collective. 3 prompts split 2 / 1 over the ranks, each sampled in a
    generate call of its own (a 1-token sampler budget): rank 0 decodes twice as often as rank 1; the 3
    evaluation records split 2 / 1; token-budgeted micro-batches differ in number: the run must neither
    hang nor drift from one plain process. FSDP2 also runs in a single process (one GPU), without torchrun."""
    common = ("--steps", "1", "--sft-steps", "0", "--eval-limit", "3", "--prompts-per-step", "3",
              "--sampler-token-budget", "1", "--save-every", "1")
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "one", *common)))
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "fsdp", *common, "--fsdp", "true",
                       "--micro-batch-tokens", "70"), nproc=2), timeout=600)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    single = subprocess.run([sys.executable, str(ROOT / "train.py"),
                             *_args(tiny_dir, tiny_data, tmp_path / "single", *common, "--fsdp", "true")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    start = load_file(tiny_dir / "model.safetensors")
    one = _final_params(tmp_path / "one", 1)
    assert any((one[n] - start[n]).abs().max() > 1e-3 for n in one), "the step did not update the parameters"
    for run in ("fsdp", "single"):
        other = _final_params(tmp_path / run, 1)
        for name in one:  # Adam turns float-order noise in near-zero gradients into ~1e-5 update noise
            assert torch.allclose(one[name], other[name], rtol=1e-4, atol=1e-4), (run, name)
    assert _rl_rows(tmp_path / "fsdp")[0]["reward"] == pytest.approx(_rl_rows(tmp_path / "one")[0]["reward"])


def test_ddp_micro_batches_with_unequal_work_match_one_whole_batch(tiny_dir, tiny_data, tmp_path):
    """3 prompts over 2 ranks (2 and 1) in micro-batches of at most 70 tokens: the ranks run different numbers of
    real micro-batches, synchronise gradients once, and end where one process with whole batches does."""
    common = ("--steps", "1", "--sft-steps", "0", "--eval-limit", "0", "--save-every", "1",
              "--prompts-per-step", "3")
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "one", *common)))
    _finish(_run(_args(tiny_dir, tiny_data, tmp_path / "two", *common, "--micro-batch-tokens", "70"), nproc=2),
            timeout=600)
    start = load_file(tiny_dir / "model.safetensors")
    one, two = _final_params(tmp_path / "one", 1), _final_params(tmp_path / "two", 1)
    assert any((one[n] - start[n]).abs().max() > 1e-3 for n in one), "the step did not update the parameters"
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-4), name
    r1, r2 = _rl_rows(tmp_path / "one")[0], _rl_rows(tmp_path / "two")[0]
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=1e-6)

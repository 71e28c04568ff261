"""rl/metrics.py: a step's row counts failure reasons under their full codes, and a batch left empty (dynamic
sampling found no group with signal) still gives a row."""
import json

import pytest
import torch

from rl.dist import Dist
from rl.metrics import memory_gb, peak_memory_gb, step_metrics, write_samples
from rl.rollout import RolloutBatch

STATS = {"loss": 0.5, "kl": 0.02, "clip_frac": 0.0, "grad_norm": 1.5, "bonus": 0.1, "cot_entropy": 0.8,
         "logp_gap_mean": 0.001, "logp_gap_max": 0.25, "tis_weight_mean": 2.0, "tis_capped_frac": 0.02, "updates": 2,
         "skipped": 0, "tokens": 20.0}


def _batch(rewards, reasons, G=2):
    n = len(rewards)
    return RolloutBatch(records=[{"id": f"r{i}", "category": "simple" if i < 2 else "parallel",
                                  "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)],
                        prompts=[[1]] * n, completions=[[5] * (i + 1) for i in range(n)], texts=["x"] * n,
                        truncated=[False, True, False, False][:n], sampler_logp=None, rewards=rewards,
                        reasons=reasons, group_size=G)


def test_reasons_keep_their_full_codes():
    batch = _batch([1.0, 0.0, 0.0, 0.0], ["", "format:no_think", "format:no_answer", "wrong_value: x=3 not in [2]"])
    row = step_metrics(batch, torch.tensor([1.0, -1.0, 0.0, 0.0]), STATS, Dist())
    assert {k: v for k, v in row.items() if k.startswith("reason/")} == {
        "reason/correct": 0.25, "reason/format:no_think": 0.25, "reason/format:no_answer": 0.25,
        "reason/wrong_value": 0.25}
    assert row["format_error_rate"] == 0.5 and row["accuracy"] == 0.25 and row["reward"] == 0.25
    assert row["acc/simple"] == 0.5 and row["acc/parallel"] == 0.0
    assert row["zero_var_frac"] == 0.5  # the second group is all wrong
    assert row["resp_len_mean"] == 2.5 and row["resp_len_max"] == 4 and row["truncated_frac"] == 0.25
    assert row["loss"] == 0.25 and row["grad_norm"] == 0.75  # means over the updates
    assert row["logp_gap_max"] == pytest.approx(0.25)


def test_an_empty_batch_still_gives_a_row():
    row = step_metrics(_batch([], []), torch.zeros(0), {**STATS, "updates": 0}, Dist())
    assert row["reward"] == 0.0 and row["resp_len_max"] == 0 and row["adv_std"] == 0.0


def test_samples_hold_prefill_and_reason(tmp_path):
    write_samples(tmp_path / "s.jsonl", 3, _batch([1.0, 0.0], ["", "wrong_count"]), "<think>")
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["step"], r["id"], r["prompt"], r["completion"], r["reason"]) for r in rows] == [
        (3, "r0", "q0", "<think>x", ""), (3, "r1", "q1", "<think>x", "wrong_count")]


def test_memory_now_follows_what_is_held_and_stays_under_the_peak():
    cpu = torch.device("cpu")
    before = memory_gb(cpu)
    held = torch.ones(64 * 2**20)  # 256 MiB, every page written
    during = memory_gb(cpu)
    assert during - before > 0.2, (before, during)
    assert during <= peak_memory_gb(cpu) + 1e-3
    vm_rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
    assert abs(memory_gb(cpu) - vm_rss_kib / 2**20) < 0.05
    del held

"""What a GRPO step logs: one metrics row (global over ranks) and, every few steps, the completions themselves.

Failure reasons are counted by their full code (`reason/format:no_think`, `reason/wrong_value`, ...; see
data.calls.REASON_CODES), plus `reason/correct` for right answers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data.calls import reason_code
from rl.grpo import zero_variance_groups
from rl.rollout import RolloutBatch


def append_row(path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def step_metrics(batch: RolloutBatch, advantages: torch.Tensor, stats: dict, d) -> dict:
    """The step's row: rewards, accuracy per category, failure reasons, response lengths and the update's
    statistics (the loss is a sum of per-rank shares, the other update statistics are averaged over ranks and
    updates). Every rank must call it (it all-reduces)."""
    n = max(stats["updates"], 1)
    averaged = ["loss", "kl", "clip_frac", "grad_norm", "bonus", "cot_entropy", "logp_gap_mean", "tis_weight_mean",
                "tis_capped_frac"]
    summed = d.all_reduce(torch.tensor([stats[k] for k in averaged], dtype=torch.float64))
    update = {k: v.item() / (1 if k == "loss" else d.world) / n for k, v in zip(averaged, summed)}
    update["logp_gap_max"] = d.all_reduce(torch.tensor(stats["logp_gap_max"]), "max").item()

    # per-completion facts from every rank (small: a few numbers and strings per completion)
    local = [(rec.get("category", "unknown"), r, reason_code(why) if why else "correct", length, cut)
             for rec, r, why, length, cut in zip(batch.records, batch.rewards, batch.reasons, batch.lengths,
                                                 batch.truncated)]
    facts = [f for shard in d.gather_objects(local) for f in shard]
    total = max(len(facts), 1)
    reasons, by_category = {}, {}
    for category, r, code, _, _ in facts:
        reasons[code] = reasons.get(code, 0) + 1
        counts = by_category.setdefault(category, [0, 0])
        counts[0] += r >= 1.0
        counts[1] += 1
    S, G = len(batch), batch.group_size
    zero_var = d.all_reduce(torch.tensor([zero_variance_groups(batch.successes(), G).float().sum().item(), S / G]))
    return {"reward": sum(f[1] for f in facts) / total,
            "accuracy": sum(f[1] >= 1.0 for f in facts) / total,
            **{f"acc/{k}": v[0] / v[1] for k, v in by_category.items()},
            **{f"reason/{k}": v / total for k, v in reasons.items()},
            "format_error_rate": sum(v for k, v in reasons.items() if k.startswith("format")) / total,
            **update,
            "adv_mean": advantages.mean().item() if S else 0.0, "adv_std": advantages.std().item() if S > 1 else 0.0,
            "zero_var_frac": (zero_var[0] / zero_var[1].clamp(min=1)).item(),
            "resp_len_mean": sum(f[3] for f in facts) / total, "resp_len_max": max((f[3] for f in facts), default=0),
            "truncated_frac": sum(f[4] for f in facts) / total}


def write_samples(path, step: int, batch: RolloutBatch, prefill: str) -> list[dict]:
    """Append the step's completions (prefill included, as the reward saw them) with their rewards and reasons;
    returns the rows written."""
    samples = [{"step": step, "id": rec["id"], "prompt": rec["messages"][-1]["content"], "completion": prefill + text,
                "reward": r, "reason": why}
               for rec, text, r, why in zip(batch.records, batch.texts, batch.rewards, batch.reasons)]
    with open(Path(path), "a") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    return samples


def peak_memory_gb(device: torch.device) -> float:
    """The most memory the process has held so far: CUDA tensors' high-water mark, or on CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    # the kernel's resident counters are approximate by a few pages per thread: keep the peak >= the current value
    return max(peak, _resident_gb() or 0.0)


def memory_gb(device: torch.device) -> float:
    """The memory held now (CUDA tensors, or on CPU the resident set): logged after every step next to the peak, it
    tells memory that something keeps across steps (it would grow from step to step) from a peak set once. On CPU
    the resident set also counts what the C allocator keeps of freed memory, which moves from step to step."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    now = _resident_gb()
    return peak_memory_gb(device) if now is None else now  # no /proc (macOS): the peak is the best there is


def _resident_gb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None

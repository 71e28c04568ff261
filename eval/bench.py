"""Benchmarks. Each prints a table and ends with one JSON line of all its figures.

    python -m eval.bench kernels   # log-prob/entropy head: naive vs chunked torch vs Triton
    python -m eval.bench sampler   # rollout tokens/s vs a naive generate loop
    python -m eval.bench step      # seconds per GRPO step and its split, peak memory
    python -m eval.bench checker   # reward/checker throughput
    python -m eval.bench data      # AST validation records/s
"""
from __future__ import annotations

import json
import platform
import sys
import time

import torch


def machine_info() -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def bench_kernels(argv):
    raise SystemExit("kernels benchmark: not implemented yet")


def bench_sampler(argv):
    raise SystemExit("sampler benchmark: not implemented yet")


def bench_step(argv):
    raise SystemExit("step benchmark: not implemented yet")


def bench_checker(argv):
    raise SystemExit("checker benchmark: not implemented yet")


def bench_data(argv):
    raise SystemExit("data benchmark: not implemented yet")


BENCHES = {"kernels": bench_kernels, "sampler": bench_sampler, "step": bench_step, "checker": bench_checker,
           "data": bench_data}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        raise SystemExit(f"choose one of: {', '.join(BENCHES)}")
    result = BENCHES[argv[0]](argv[1:])
    if result is not None:
        print(json.dumps({"bench": argv[0], **machine_info(), **result}))


if __name__ == "__main__":
    main()

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
    """Parse + check 10,000 BFCL-style outputs (right answers, near misses, prose, malformed) on one core,
    through the BFCL scoring path and through the think-format reward."""
    import argparse
    import random

    from data.calls import check_calls, decode_bfcl_result
    from eval.bfcl import load_category
    from rl.reward import reward

    ap = argparse.ArgumentParser(prog="python -m eval.bench checker")
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    cases = []
    for category in ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                     "irrelevance", "live_irrelevance"):
        for it in load_category(category):
            gt = it["ground_truth"] or []
            calls = []
            for expected in gt:
                (name, params), = expected.items()
                kw = {p: v[0] for p, v in params.items() if v and not (type(v[0]) is str and v[0] == "")}
                calls.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})")
            right = "[" + ", ".join(calls) + "]"
            variants = [right, right.replace("=", "= ", 1), right[: len(right) // 2], "I cannot help with that.",
                        right.upper(), "```\n" + right + "\n```"]
            cases.append((rng.choice(variants), it))
    rng.shuffle(cases)
    cases = (cases * (args.n // len(cases) + 1))[: args.n]

    t0 = time.perf_counter()
    correct = 0
    for text, it in cases:
        correct += check_calls(decode_bfcl_result(text), it["ground_truth"] or [], it["function"], it["category"])[0]
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for text, it in cases:
        reward("<think>ok</think><answer>" + text + "</answer>", it)
    reward_s = time.perf_counter() - t0

    rows = [{"path": "bfcl score (decode + check)", "outputs": len(cases), "seconds": score_s,
             "outputs_per_s": len(cases) / score_s},
            {"path": "reward (think format)", "outputs": len(cases), "seconds": reward_s,
             "outputs_per_s": len(cases) / reward_s}]
    print_table(rows, ["path", "outputs", "seconds", "outputs_per_s"])
    return {"outputs": len(cases), "score_seconds": round(score_s, 3), "reward_seconds": round(reward_s, 3),
            "score_outputs_per_s": round(len(cases) / score_s), "fraction_correct": round(correct / len(cases), 3),
            "target_seconds": 5.0}


def bench_data(argv):
    """AST validation records/s on one core (pure Python, one process), and the whole --skip-llm pipeline
    (read, convert, validate, write) on an xLAM-style file. Records: the embedded default data, with 20%
    given string-typed numbers (safe repairs) and 5% made invalid (rejects)."""
    import argparse
    import random
    import tempfile
    from pathlib import Path

    from data.default import load_default
    from data.prepare import prepare
    from data.validate import RecordError, validate_record

    ap = argparse.ArgumentParser(prog="python -m eval.bench data")
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    rng = random.Random(0)
    base = load_default("train") + load_default("val")
    records = []
    for i in range(args.records):
        r = json.loads(json.dumps(base[i % len(base)]))
        r["id"] = f"{r['id']}-{i}"
        u = rng.random()
        if r["answers"] and u < 0.2:  # numbers as strings: repaired
            a = r["answers"][0]["arguments"]
            for k, v in a.items():
                if type(v) in (int, float):
                    a[k] = str(v)
        elif r["answers"] and u < 0.25:  # an unknown parameter: rejected
            r["answers"][0]["arguments"]["bogus"] = 1
        records.append(r)

    records_json = json.dumps(records)

    def time_ast():
        work = json.loads(records_json)  # validation repairs in place: time fresh copies (copying untimed)
        t0 = time.perf_counter()
        kept = repaired = 0
        for r in work:
            try:
                repaired += bool(validate_record(r))
                kept += 1
            except RecordError:
                pass
        return time.perf_counter() - t0, kept, repaired

    ast_runs = [time_ast() for _ in range(args.repeats)]
    ast_s, kept, repaired = min(ast_runs)

    n_pipe = min(args.records, 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "xlam.jsonl"
        with open(src, "w") as f:
            for r in records[:n_pipe]:
                f.write(json.dumps({"id": r["id"], "query": r["messages"][0]["content"],
                                    "tools": json.dumps(r["tools"]), "answers": json.dumps(r["answers"])}) + "\n")
        pipe_s = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            stats = prepare([src], Path(tmp) / f"out{k}", progress=False)
            pipe_s.append(time.perf_counter() - t0)
    rows = [{"stage": "ast validation", "records": len(records), "kept": kept, "repaired": repaired,
             "seconds": ast_s, "records_per_s": len(records) / ast_s},
            {"stage": "pipeline --skip-llm", "records": n_pipe, "kept": stats["train"] + stats["val"],
             "repaired": None, "seconds": min(pipe_s), "records_per_s": n_pipe / min(pipe_s)}]
    print_table(rows, ["stage", "records", "kept", "repaired", "seconds", "records_per_s"])
    ast_rate = len(records) / ast_s
    print(f"AST validation: {ast_rate:,.0f} records/s on one core (target >= 20,000)")
    return {"ast_records_per_s": round(ast_rate), "pipeline_records_per_s": round(n_pipe / min(pipe_s)),
            "records": len(records), "target_ast_records_per_s": 20_000, "meets_target": ast_rate >= 20_000}


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

"""BFCL: load the single-turn categories and score model results with BFCL's AST semantics.

    python -m eval.bfcl score --category simple_python --results results.jsonl [--data-dir DIR]

results.jsonl holds one {"id": ..., "result": "<raw model text>"} per line (BFCL's result format). The raw
text may carry <think>/<answer> tags: the <answer> content is scored when present, else the whole text,
decoded with BFCL's prompt-mode rules. Prints one JSON object: accuracy, correct, total, per_id (and the
count of each failure reason).

Data: the files shipped in the PyPI package bfcl-eval (`pip install --no-deps bfcl-eval`), found on the
Python path without importing the package, or any directory laid out like its data/ folder (--data-dir):
BFCL_v<N>_<category>.json and possible_answer/BFCL_v<N>_<category>.json, one JSON object per line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import site
import sys

from data.calls import check_calls, decode_bfcl_result

# single-turn categories scored here; "simple" is accepted as a short name for simple_python
AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES
ALIASES = {"simple": "simple_python"}


class BFCLDataError(Exception):
    """Missing data, unknown category or mismatched ids: a message that says what to do."""


def find_data_dir() -> str:
    """The data/ folder of the installed bfcl-eval package, located on the path without importing it."""
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:
        pass
    for root in roots:
        candidate = os.path.join(root or ".", "bfcl_eval", "data")
        if os.path.isdir(candidate):
            return candidate
    raise BFCLDataError("BFCL data not found: install it with `pip install --no-deps bfcl-eval` "
                        "or pass --data-dir pointing at a folder laid out like bfcl_eval/data")


def _category_file(folder: str, category: str) -> str | None:
    """The newest BFCL_v<N>_<category>.json in folder, or None."""
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(rf"BFCL_v(\d+)_{re.escape(category)}\.json")
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := pattern.fullmatch(name))]
    return os.path.join(folder, max(found)[1]) if found else None


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _flatten_question(question) -> list[dict]:
    if isinstance(question, str):
        return [{"role": "user", "content": question}]
    out = []
    for item in question:
        out.extend(_flatten_question(item) if isinstance(item, list) else [item])
    return out


def load_category(category: str, data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """Items of one category: {"id", "question" (flat list of chat messages), "function" (tool schemas),
    "ground_truth" (list of {name: {param: [allowed]}}; None for irrelevance/relevance), "category"}."""
    category = ALIASES.get(category, category)
    if category not in CATEGORIES:
        raise BFCLDataError(f"unknown or unsupported category {category!r}; choose one of: {', '.join(CATEGORIES)}")
    data_dir = data_dir or find_data_dir()
    path = _category_file(data_dir, category)
    if path is None:
        raise BFCLDataError(f"no BFCL_v*_{category}.json in {data_dir}: is this a BFCL data folder?")
    entries = _read_jsonl(path)
    answers = [None] * len(entries)
    if category in AST_CATEGORIES:
        answer_path = _category_file(os.path.join(data_dir, "possible_answer"), category)
        if answer_path is None:
            raise BFCLDataError(f"no possible_answer/BFCL_v*_{category}.json in {data_dir}: the category "
                                "needs its ground truth")
        answers = [a["ground_truth"] for a in _read_jsonl(answer_path)]
        if len(answers) != len(entries):
            raise BFCLDataError(f"{path} has {len(entries)} entries but {answer_path} has {len(answers)}")
    # BFCL pairs questions and answers by position (some answer ids are spelled differently)
    items = [{"id": e["id"], "question": _flatten_question(e["question"]), "function": e["function"],
              "ground_truth": gt, "category": category} for e, gt in zip(entries, answers)]
    return items[:limit] if limit is not None else items


def score_results(items: list[dict], results: list[dict]) -> dict:
    """Score {"id", "result"} rows against loaded items. Every id must be in the data, once."""
    by_id = {it["id"]: it for it in items}
    per_id, reasons = {}, collections.Counter()
    for row in results:
        rid = row.get("id")
        if rid not in by_id:
            raise BFCLDataError(f"result id {rid!r} is not in category {items[0]['category'] if items else '?'}; "
                                "check --category and the results file")
        if rid in per_id:
            raise BFCLDataError(f"result id {rid!r} appears twice in the results file")
        item = by_id[rid]
        calls = decode_bfcl_result(row.get("result"))
        ok, reason = check_calls(calls, item["ground_truth"] or [], item["function"], item["category"])
        per_id[rid] = ok
        if not ok:
            reasons[reason.split(": ", 1)[0]] += 1
    correct = sum(per_id.values())
    total = len(per_id)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "per_id": per_id, "reasons": dict(reasons)}


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise BFCLDataError(f"results file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise BFCLDataError(f"{path}:{n} is not a JSON line") from None
            if not isinstance(row, dict) or "id" not in row or "result" not in row:
                raise BFCLDataError(f'{path}:{n} must be {{"id": ..., "result": ...}}')
            rows.append(row)
    return rows


def cmd_score(args) -> dict:
    items = load_category(args.category, args.data_dir)
    result = score_results(items, read_results(args.results))
    return {"category": items[0]["category"] if items else args.category, **result}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.bfcl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a results file (BFCL's {id, result} JSON lines)")
    p.add_argument("--category", required=True, help=f"one of: {', '.join(CATEGORIES)}")
    p.add_argument("--results", required=True, help="JSON lines of {\"id\": ..., \"result\": \"raw model text\"}")
    p.add_argument("--data-dir", default=None, help="folder laid out like bfcl_eval/data (default: the installed package)")
    args = parser.parse_args(argv)
    try:
        out = {"score": cmd_score}[args.command](args)
    except BFCLDataError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

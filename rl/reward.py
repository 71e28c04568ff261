"""The reward: a format gate plus the BFCL checker's verdict.

    reward(text, record) -> (1.0, "")                 format right and calls right
                         -> (0.0, "<code>: detail")   otherwise; the code is one of data.calls.REASON_CODES

`text` is the full assistant text: the prefill the prompt ended with (e.g. "<think>") plus the sampled
completion. `record` is a training record ({"tools", "answers", "category", ...}) or a BFCL item carrying
"ground_truth" and "function".

mode="binary" (default) is the paper's strict criterion. mode="graded" gives partial credit, for ablations:
0.1 for a well-formed, decodable answer, 0.3 x the fraction of expected function names matched, 0.6 x the
fraction of right arguments over the matched calls; exactly 1.0 only when the binary verdict is right.
"""
from __future__ import annotations

from data.calls import category_kind, check_calls, check_one, ground_truth_from_answers, parse_completion

FORMAT_WEIGHT, NAME_WEIGHT, ARGS_WEIGHT = 0.1, 0.3, 0.6


def record_ground_truth(record: dict) -> tuple[list[dict], list[dict], str]:
    """(ground_truth, tools, category) of a training record or a BFCL item."""
    tools = record.get("tools", record.get("function")) or []
    category = record.get("category", "simple")
    if record.get("ground_truth") is not None:
        return record["ground_truth"], tools, category
    answers = record.get("answers") or []
    if not answers and category_kind(category) not in ("irrelevance", "relevance"):
        category = "irrelevance"   # [] means "no call is correct"
    return ground_truth_from_answers(answers, tools), tools, category


def reward(text: str, record: dict, answer_format: str = "think", mode: str = "binary") -> tuple[float, str]:
    """Reward of one completion. Never raises on model text (a malformed record still raises)."""
    if mode not in ("binary", "graded"):
        raise ValueError(f"mode must be 'binary' or 'graded', got {mode!r}")
    ground_truth, tools, category = record_ground_truth(record)
    parsed = parse_completion(text, answer_format)
    if not parsed.well_formed:
        return 0.0, parsed.error
    kind = category_kind(category)
    if parsed.calls is None and kind not in ("irrelevance", "relevance"):
        return 0.0, parsed.error   # format:parse_error
    # for (ir)relevance an answer that does not decode is "no call", as in BFCL
    ok, reason = check_calls(parsed.calls, ground_truth, tools, category)
    if ok:
        return 1.0, ""
    if mode == "binary":
        return 0.0, reason
    return graded_score(parsed.calls, ground_truth, tools, kind), reason


def graded_score(calls: list[dict] | None, ground_truth: list[dict], tools: list[dict], kind: str) -> float:
    """Partial credit for a wrong answer (below 1.0 by construction)."""
    if kind in ("irrelevance", "relevance"):
        return FORMAT_WEIGHT   # well formed, wrong decision
    if calls is None:
        return 0.0
    n = max(len(calls), len(ground_truth), 1)
    used = [False] * len(calls)
    names, args_score = 0, 0.0
    # pair each expected call with the first unused call of the same name, as the checker pairs them
    for expected in ground_truth:
        (name, params), = expected.items()
        tool = next((t for t in tools if t.get("name") == name), None)
        for i, call in enumerate(calls):
            if used[i] or call.get("name") != name:
                continue
            used[i] = True
            names += 1
            args_score += _argument_fraction(call, tool, name, params)
            break
    score = FORMAT_WEIGHT + NAME_WEIGHT * names / n + ARGS_WEIGHT * args_score / n
    return min(score, 0.99)


def _argument_fraction(call: dict, tool: dict | None, name: str, params: dict) -> float:
    """Fraction of parameters (expected ones and the call's own) that the checker would accept one by one."""
    args = call.get("arguments") or {}
    keys = list(params) + [p for p in args if p not in params]
    if not keys:
        return 1.0
    right = 0
    for p in keys:
        single_call = {"name": name, "arguments": {p: args[p]} if p in args else {}}
        single_expected = {name: {p: params[p]} if p in params else {}}
        single_tool = None
        if tool is not None:
            schema = tool.get("parameters") or {}
            single_tool = {"name": name, "parameters": {"properties": schema.get("properties") or {},
                                                        "required": [p] if p in (schema.get("required") or []) else []}}
        reason = check_one(single_call, single_tool, single_expected)
        right += reason == ""
    return right / len(keys)

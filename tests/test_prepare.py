"""Data pipeline: converters, bad input, the LLM judge stage, resumable output (AST rules: test_validate.py)."""
import json
import re
from pathlib import Path

import pytest

from data.prepare import (bfcl_category, from_bfcl, from_hermes, from_xlam, llm_stage, main, parse_call_list,
                          parse_verdict, prepare, split_of)
from data.validate import RecordError, load_records, validate_record

BFCL_DATA = Path(__import__("bfcl_eval").__file__).parent / "data"

from test_validate import TIME, WEATHER, call, rec  # noqa: E402,F401  (shared record builders)


# ----------------------------------------------------------------------------- converters

def test_xlam_converter():
    raw = {"id": 7, "query": "Giveaways for beta and games?",
           "tools": json.dumps([{"name": "live_giveaways_by_type", "description": "Giveaways.", "parameters": {
               "type": {"description": "Kind.", "type": "str", "default": "game"},
               "limit": {"description": "How many.", "type": "int"},
               "platform": {"description": "Platform.", "type": "str, optional", "default": ""}}}]),
           "answers": json.dumps([{"name": "live_giveaways_by_type", "arguments": {"type": "beta", "limit": "5"}},
                                  {"name": "live_giveaways_by_type", "arguments": {"type": "game", "limit": 5}}])}
    r = from_xlam(raw)
    assert r["id"] == "xlam-7" and r["category"] == "parallel"
    params = r["tools"][0]["parameters"]
    assert params["properties"]["type"]["type"] == "string"  # a parameter named "type" is not the schema's type
    assert params["required"] == ["limit"]  # a default or "optional" makes a parameter optional
    assert validate_record(r) == ["int-from-string:live_giveaways_by_type.limit"]
    assert from_xlam({**raw, "answers": "[]"})["category"] == "irrelevance"


def test_bfcl_converter_takes_first_allowed_values():
    q = {"id": "parallel_multiple_12", "question": [[{"role": "user", "content": "q"}]], "function": [
        {"name": "a", "parameters": {"type": "dict", "properties": {"x": {"type": "float"}, "y": {"type": "float"},
                                                                      "z": {"type": "float"}}, "required": ["x"]}},
        {"name": "b", "parameters": {"type": "dict", "properties": {
            "d": {"type": "dict", "properties": {"k": {"type": "string"}, "m": {"type": "integer"}}},
            "l": {"type": "array", "items": {"type": "dict", "properties": {"n": {"type": "string"}}}}}}}]}
    gt = {"parallel_multiple_12": [{"a": {"x": [4.0], "y": ["", 0.5], "z": [1.5, ""]}},
                                   {"b": {"d": [{"k": ["v", "w"], "m": [""]}], "l": [[{"n": ["p"]}]]}}]}
    r = from_bfcl(q, gt)
    assert r["answers"] == [{"name": "a", "arguments": {"x": 4.0, "z": 1.5}},
                            {"name": "b", "arguments": {"d": {"k": "v"}, "l": [{"n": "p"}]}}]
    assert r["category"] == "parallel_multiple" and validate_record(r) == []
    assert [bfcl_category(i) for i in ("simple_python_3", "live_multiple_0-0-0", "live_irrelevance_5-1-0",
                                       "simple_java_2")] == ["simple", "multiple", "irrelevance", "simple"]
    irr = from_bfcl({**q, "id": "irrelevance_3"}, {})
    assert irr["answers"] == [] and irr["category"] == "irrelevance"
    with pytest.raises(RecordError, match="convert:no-ground-truth"):
        from_bfcl({**q, "id": "simple_python_99999"}, gt)


def test_bfcl_files_convert_end_to_end(tmp_path):
    src = tmp_path / "bfcl"
    (src / "possible_answer").mkdir(parents=True)
    for name in ("BFCL_v4_simple_python.json", "BFCL_v4_live_multiple.json"):
        (src / name).write_text("".join(open(BFCL_DATA / name).readlines()[:40]))
        (src / "possible_answer" / name).write_text((BFCL_DATA / "possible_answer" / name).read_text())
    stats = prepare([src / "BFCL_v4_simple_python.json", src / "BFCL_v4_live_multiple.json"], tmp_path / "out",
                    progress=False)
    assert stats["total"] == 80 and stats["train"] + stats["val"] >= 75  # a few BFCL answers do not fit their schema
    first = json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])
    assert first["source"] == "bfcl" and first["tools"][0]["parameters"]["type"] == "object"


def test_hermes_converter():
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Local time.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    raw = {"id": "h1", "conversations": [
        {"from": "system", "value": f"You may call functions. <tools> {json.dumps(tools)} </tools> Use them."},
        {"from": "human", "value": "Time in Oslo and Lima?"},
        {"from": "gpt", "value": '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>'},
        {"from": "tool", "value": "<tool_response>...</tool_response>"}]}
    r = from_hermes(raw)
    assert r["messages"] == [{"role": "user", "content": "Time in Oslo and Lima?"}]
    assert r["answers"] == [{"name": "get_time", "arguments": {"city": c}} for c in ("Oslo", "Lima")]
    assert r["category"] == "parallel" and validate_record(r) == []
    # ToolACE: tools as a JSON list in a "system" field, answer as a Python-style call list
    toolace = {"system": "Here is a list of functions in JSON format: " + json.dumps([tools[0]["function"]]),
               "conversations": [{"from": "user", "value": "Time in Oslo?"},
                                 {"from": "assistant", "value": "[get_time(city='Oslo')]"}]}
    assert from_hermes(toolace)["answers"] == [{"name": "get_time", "arguments": {"city": "Oslo"}}]
    text_reply = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                  "tools": tools}
    assert from_hermes(text_reply)["category"] == "irrelevance"
    bad_reply = {"from": "gpt", "value": "<tool_call>{oops</tool_call>"}
    bad = {**raw, "conversations": raw["conversations"][:2] + [bad_reply]}
    with pytest.raises(RecordError, match="convert:bad-tool-call"):
        from_hermes(bad)


def test_parse_call_list_never_executes():
    assert parse_call_list("[f(a=1, b='x'), m.g(c=[1, 2])]") == [
        {"name": "f", "arguments": {"a": 1, "b": "x"}}, {"name": "m.g", "arguments": {"c": [1, 2]}}]
    assert parse_call_list('```json\n[{"name": "f", "arguments": {"a": 1}}]\n```') == [
        {"name": "f", "arguments": {"a": 1}}]
    assert parse_call_list("[]") == []
    for bad in ("[__import__('os').system('echo hi')]", "[f(a=open('x'))]", "[f(1)]", "not a call", ""):
        assert parse_call_list(bad) is None


# ----------------------------------------------------------------------------- pipeline, bad input, resume

def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()] if Path(path).exists() else []


def _outputs(out):
    return {n: _lines(Path(out) / f"{n}.jsonl") for n in ("train", "val", "rejects")}


def _xlam_row(i, city="Paris", bad=False):
    tools = [{"name": "get_weather", "description": "w", "parameters": {"city": {"type": "str", "description": "c"},
                                                                       "days": {"type": "int, optional"}}}]
    args = {"city": city, "days": "x" if bad else str(i % 5 + 1)}
    return {"id": i, "query": f"weather in {city} for {i % 5 + 1} days", "tools": json.dumps(tools),
            "answers": json.dumps([{"name": "get_weather", "arguments": args}])}


def _mixed_input(tmp_path, n=60):
    """JSON lines with good rows, schema violations, bad JSON, a wrong field type, bytes that are not UTF-8,
    a duplicate id and a record of an unknown format."""
    lines = []
    for i in range(n):
        if i % 10 == 3:
            lines.append(b'{"id": %d, "query": "broken' % i)
        elif i % 10 == 5:
            lines.append(json.dumps(_xlam_row(i, bad=True)).encode())
        elif i % 10 == 7:
            lines.append(json.dumps({**_xlam_row(i), "tools": 5}).encode())
        elif i % 10 == 8:
            lines.append(b'{"id": 1, "query": "\xff\xfe"}')
        else:
            lines.append(json.dumps(_xlam_row(i)).encode())
    lines.append(json.dumps(_xlam_row(0, city="Rome")).encode())  # duplicate id 0
    lines.append(b'{"something": "else"}')
    lines.append(b"")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, n + 2


def test_bad_input_is_reported_and_processing_goes_on(tmp_path, capsys):
    path, n = _mixed_input(tmp_path)
    stats = prepare([path], tmp_path / "out", progress=False)
    out = _outputs(tmp_path / "out")
    assert stats["total"] == n == sum(len(v) for v in out.values())
    by_reason = {r["reason"] for r in out["rejects"]}
    assert {"read:bad-json", "read:not-utf8", "convert:tools-type", "ast:type", "dedup:duplicate-id",
            "convert:unknown-format"} <= by_reason
    for r in out["rejects"]:
        assert re.fullmatch(rf"{re.escape(str(path))}:\d+", r["where"]) and r["stage"] and r["detail"]
    err = capsys.readouterr().err
    assert f"{path}:4: read:bad-json" in err and f"{path}:9: read:not-utf8" in err
    assert stats["rejected_by_stage"]["read"] == 12 and stats["repairs"]["int-from-string"] > 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["total"] == n


def _ids(out):
    o = _outputs(out)
    return [r["id"] for v in o.values() for r in v]


@pytest.mark.parametrize("judged", [False, True])
def test_nothing_lost_across_interrupted_and_resumed_runs(tmp_path, judged):
    path, n = _mixed_input(tmp_path)
    other = tmp_path / "more.json"  # a JSON-array file as a second input
    other.write_text(json.dumps([_xlam_row(1000 + i) for i in range(15)]))
    n += 15
    judge = FakeJudge() if judged else None
    kw = dict(progress=False, judge=judge, rounds=1, batch_size=4)
    reference = tmp_path / "ref"
    prepare([path, other], reference, **kw)
    assert sorted(_ids(reference)) == sorted(set(_ids(reference))) and len(_ids(reference)) == n

    class Stop(Exception):
        pass

    out = tmp_path / "out"
    for stop_after in (7, 23, 45):  # three interruptions, each a little further in
        written = {"n": len(_ids(out))}

        def hook(_id, limit=stop_after):
            written["n"] += 1
            if written["n"] >= limit:
                raise Stop

        with pytest.raises(Stop):
            prepare([path, other], out, on_record=hook, **kw)
        assert len(_ids(out)) == stop_after
    # a half-written last line (killed mid-write) is cut off on resume
    with open(out / "train.jsonl", "a") as f:
        f.write('{"id": "partial", "mess')
    stats = prepare([path, other], out, **kw)
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == n == stats["total"]
    assert _outputs(out).keys() == _outputs(reference).keys()
    for name in ("train", "val", "rejects"):  # same records land in the same place as in one go
        key = (lambda r: r["id"])
        assert sorted(_outputs(out)[name], key=key) == sorted(_outputs(reference)[name], key=key)
    prepare([path, other], out, **kw)  # a rerun of a finished run adds nothing
    assert len(_ids(out)) == n


def test_split_is_deterministic_by_id(tmp_path):
    ids = [f"x-{i}" for i in range(4000)]
    val = [i for i in ids if split_of(i, 0.1) == "val"]
    assert 300 < len(val) < 500 and val == [i for i in ids if split_of(i, 0.1) == "val"]
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(_xlam_row(1)) + "\n")
    prepare([path], tmp_path / "out", progress=False)
    with pytest.raises(SystemExit, match="other settings"):
        prepare([path], tmp_path / "out", progress=False, val_fraction=0.5)


def test_cli_end_to_end(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(_xlam_row(i)) + "\n" for i in range(30)))
    main(["--input", str(path), "--out", str(tmp_path / "out"), "--skip-llm", "--val-fraction", "0.2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["total"] == 30 and summary["train"] + summary["val"] == 30 and summary["val"] > 0
    records = load_records(tmp_path / "out" / "train.jsonl")
    assert records[0]["answers"][0]["arguments"]["days"] in range(1, 6)  # "3" repaired to 3
    with pytest.raises(SystemExit):
        main(["--input", str(path), "--out", str(tmp_path / "o2")])  # neither a judge nor --skip-llm


# ----------------------------------------------------------------------------- the judge stage

class FakeJudge:
    """Deterministic judge that reads the proposed answer out of the prompt:
    days=1 is right; days>=2 gets corrected to days-1 (so K rounds matter); city 'Nowhere' is unsolvable;
    days=0 gets a correction that fails AST validation; days=4 gets gibberish."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        replies = []
        for messages in prompts:
            user = messages[-1]["content"]
            answer = json.loads(user.split("Proposed answer:\n", 1)[1])
            if not answer:
                replies.append("SOLVABLE: no\nCORRECT: yes")
                continue
            args = answer[0]["arguments"]
            days = args.get("days", 1)
            if args["city"] == "Nowhere":
                replies.append("SOLVABLE: no\nCORRECT: no")
            elif days == 4:
                replies.append("I think it is fine.")
            elif days == 1:
                replies.append("SOLVABLE: yes\nCORRECT: yes")
            elif days == 0:
                replies.append("SOLVABLE: yes\nCORRECT: no\nANSWER: [get_weather(town='Paris')]")
            else:
                replies.append(f"SOLVABLE: yes\nCORRECT: no\nANSWER: [get_weather(city='{args['city']}', "
                               f"days={days - 1})]")
        return replies


def test_parse_verdict_is_strict():
    assert parse_verdict("SOLVABLE: yes\nCORRECT: yes")["correct"] is True
    v = parse_verdict("SOLVABLE: Yes\nCORRECT: no\nANSWER: [f(a=1)]")
    assert v["solvable"] and not v["correct"] and v["answer"] == [{"name": "f", "arguments": {"a": 1}}]
    assert parse_verdict("SOLVABLE: yes\nCORRECT: no")["error"] == "judge:no-correction"
    assert parse_verdict("SOLVABLE: yes\nCORRECT: no\nANSWER: f(")["error"] == "judge:bad-correction"
    for bad in ("yes", "SOLVABLE: yes", "SOLVABLE: yes\nCORRECT: maybe", "CORRECT: yes\nCORRECT: no\nSOLVABLE: yes",
                "**SOLVABLE: yes**\n**CORRECT: yes**", ""):
        v = parse_verdict(bad)
        assert v["correct"] is False and v["error"] == "judge:unparseable"


def _judge_records():
    return [rec(call(days=d), rid=f"d{d}") for d in (1, 2, 3, 0, 4)] + \
        [rec([{"name": "get_weather", "arguments": {"city": "Nowhere"}}], rid="nowhere"),
         rec([], tools=[TIME], rid="irr")]


@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
def test_llm_stage_rounds_revalidation_and_final_pass(rounds):
    judge = FakeJudge()
    results = dict(zip([r["id"] for r in _judge_records()], llm_stage(_judge_records(), judge, rounds)))
    kept = {k: v[0] for k, v in results.items() if v[0] is not None}
    rejected = {k: v[1] for k, v in results.items() if v[1] is not None}
    assert kept["d1"]["prep"] == {"judge_rounds": 1} and kept["irr"]["answers"] == []
    assert rejected["d4"][1] == "judge:unparseable" and rejected["nowhere"][1] == "judge:unsolvable"
    if rounds == 0:  # no corrections at all: only the final judgement
        assert rejected["d2"] == ("llm-final", "judge:no", rejected["d2"][2]) and "d0" in rejected
    else:
        assert rejected["d0"][:2] == ("llm", "judge:correction-ast:unknown-param")
        assert kept["d2"]["answers"] == call(days=1) and kept["d2"]["prep"] == {"judge_rounds": 2, "corrected": True}
    # d3 needs two corrections (3 -> 2 -> 1): kept with K >= 2, dropped by the final pass with K = 1
    if rounds >= 2:
        assert kept["d3"]["answers"] == call(days=1) and kept["d3"]["prep"]["judge_rounds"] == 3
    else:
        assert rejected["d3"][:2] == ("llm-final", "judge:no")
    assert len(judge.calls) <= rounds + 1 and judge.calls[0] == 7  # one batched call per round


def test_llm_stage_in_the_pipeline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(_xlam_row(i)) + "\n" for i in range(20)))  # days = i % 5 + 1
    stats = prepare([path], tmp_path / "out", judge=FakeJudge(), rounds=1, batch_size=6, progress=False)
    # K=1: days=1 is kept, days=2 kept after one correction, days=3 still wrong at the final pass,
    # days=4 unparseable in round 1, days=5 corrected to 4 and then unparseable at the final pass
    assert stats["train"] + stats["val"] == 8 and stats["judge_corrected"] == 4
    assert stats["rejected_by_reason"] == {"judge:unparseable": 8, "judge:no": 4}
    assert stats["rejected_by_stage"] == {"llm": 4, "llm-final": 8}


def test_hf_judge_smoke_with_a_tiny_model(tiny_model, tiny_tokenizer, tmp_path):
    """The real path end to end: prompts through the chat template, batched greedy generation with the
    project's sampler, strict parsing (a random model's reply is unparseable, so everything is rejected)."""
    from data.prepare import hf_judge
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(_xlam_row(i)) + "\n" for i in range(3)))
    judge = hf_judge(tiny_model, tiny_tokenizer, max_new_tokens=6)
    stats = prepare([path], tmp_path / "out", judge=judge, rounds=1, batch_size=2, progress=False)
    assert stats["total"] == 3 and stats["rejected_by_reason"] == {"judge:unparseable": 3}
    replies = judge([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello there"}]])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)

"""Data pipeline: converters, bad input, the LLM judge stage, resumable output (AST rules: test_validate.py)."""
import codecs
import json
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    for bad in ("[__import__('os').system('echo hi')]", "[f(a=open('x'))]", "[f(1)]", "not a call", "",
                "[f(a=b'x')]", "[f(a={1, 2})]", "[f(**{'a': 1})]", "lambda:" * 3000, "[f(a=(((0,)*9**9,)*9**9,)*9**9)]"):
        t0 = time.perf_counter()
        assert parse_call_list(bad) is None
        assert time.perf_counter() - t0 < 2


# ----------------------------------------------------------------------------- pipeline, bad input, resume

def _lines(path):
    # split on "\n" only: a record may hold U+0085 or U+2028, which str.splitlines also takes for line ends
    return [json.loads(x) for x in Path(path).read_text().split("\n") if x.strip()] if Path(path).exists() else []


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


# ----------------------------------------------------------------------------- hostile records
# Each of these once stopped the whole run (and a rerun stopped at the same record).

def _hostile_records():
    """(JSON line, reason it is rejected with, or None when it is kept)."""
    out = []
    r = rec(call(), rid="required-list")
    r["tools"][0]["parameters"]["required"] = [["city"]]
    out.append((json.dumps(r), "record:tools"))
    r = rec(call(unit="celsius"), rid="enum-not-list")
    r["tools"][0]["parameters"]["properties"]["unit"]["enum"] = 5
    out.append((json.dumps(r), "ast:schema"))
    out.append((json.dumps(rec(call(days="1" * 5000), rid="int-5000")), "ast:type"))
    out.append((json.dumps(rec(call(scale="1" * 400), rid="number-400")), "ast:type"))
    out.append((json.dumps(rec(call(scale="1e400"), rid="number-inf")), "ast:type"))
    out.append(('{"id": "big-int", "query": "q", "tools": [], "answers": [], "n": ' + "1" * 5000 + "}", "read:bad-json"))
    out.append(('{"id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "read:bad-json"))
    deep = "[" * 300 + "]" * 300
    out.append((json.dumps(rec(call(), rid="deep-300"))[:-1] + f', "x": {deep}}}', "record:too-deep"))
    out.append((json.dumps(rec(call(), rid="surrogate", query="caf\ud800")), "record:unicode"))
    out.append((json.dumps(rec(call(), rid="nan"))[:-1] + ', "x": NaN}', "record:number"))
    # a repair that decodes a JSON string too deep to write: rejected at the write
    out.append((json.dumps(rec(call(where='{"lat": 1, "x": ' + deep + "}"), rid="deep-repair")), "record:too-deep"))
    hermes = {"id": "lambda", "tools": [WEATHER], "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "lambda:" * 3000}]}
    out.append((json.dumps(hermes), None))  # a plain-text reply: an irrelevance record
    out.append((json.dumps(_xlam_row(5)), None))
    return out


def test_every_hostile_record_is_accounted_for_and_reruns_finish(tmp_path):
    cases = _hostile_records()
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(line for line, _ in cases) + "\n")
    stats = prepare([path], tmp_path / "out", progress=False)
    assert stats["total"] == len(cases)
    out = _outputs(tmp_path / "out")
    rejects = {r["id"]: r for r in out["rejects"]}
    kept = {r["id"] for r in out["train"] + out["val"]}
    for i, (line, reason) in enumerate(cases):
        rid = json.loads(line)["id"] if reason != "read:bad-json" else f"hostile.jsonl:{i + 1}"
        if reason is None:
            assert str(rid) in kept or f"xlam-{rid}" in kept, rid
        else:
            assert rejects[rid]["reason"] == reason and rejects[rid]["detail"], (rid, rejects.get(rid))
            assert len(rejects[rid]["detail"]) <= 500
    assert prepare([path], tmp_path / "out", progress=False)["total"] == len(cases)  # a rerun adds nothing
    for name in ("train.jsonl", "val.jsonl"):  # what is kept, train.py can read
        if _lines(tmp_path / "out" / name):
            load_records(tmp_path / "out" / name)


def test_byte_order_mark_is_skipped(tmp_path):
    array = tmp_path / "a.json"
    array.write_bytes(codecs.BOM_UTF8 + json.dumps([_xlam_row(i) for i in range(5)], indent=2).encode())
    lines = tmp_path / "b.jsonl"
    lines.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(_xlam_row(10 + i)) + "\n" for i in range(5)).encode())
    stats = prepare([array, lines], tmp_path / "out", progress=False)
    assert stats["total"] == 10 and stats["rejected"] == 0


def test_a_bad_element_of_a_json_array_is_rejected_alone(tmp_path):
    good = [json.dumps(_xlam_row(i)).encode() for i in range(6)]
    bad = [b'{"id": 90, "n": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000,
           b'{"id": 91, "query": "caf\xff", "tools": "[]", "answers": "[]"}', b'"a string"']
    path = tmp_path / "a.json"
    path.write_bytes(b"[" + b",\n".join(good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]) + b"]\n")
    stats = prepare([path], tmp_path / "out", progress=False)
    assert stats["total"] == 10 and stats["train"] + stats["val"] == 6
    assert stats["rejected_by_reason"] == {"read:bad-json": 2, "record:unicode": 1, "convert:not-an-object": 1}
    # a broken array (a missing comma): what comes before it is kept, the rest is one reject
    path.write_bytes(b"[" + b",".join(good[:3]) + b" " + b",".join(good[3:]) + b"]")
    stats = prepare([path], tmp_path / "out2", progress=False)
    assert stats["train"] + stats["val"] == 3 and stats["rejected_by_reason"] == {"read:bad-json": 1}


def test_judge_replies_never_raise():
    for reply in (None, 5, "SOLVABLE: yes\nCORRECT: no\nANSWER: " + "lambda:" * 3000,
                  "SOLVABLE: yes\nCORRECT: no\nANSWER: [f(a=" + "[" * 100_000 + ")]",
                  "SOLVABLE: yes\nCORRECT: no\nANSWER: [f(a={(((0,)*100000,)*100000,)*100000: 1})]",
                  "SOLVABLE: yes\nCORRECT: no\nANSWER: " + "[" * 100_000 + "]" * 100_000,
                  'SOLVABLE: yes\nCORRECT: no\nANSWER: [{"name": "f", "arguments": {"a": ' + "1" * 5000 + "}}]"):
        v = parse_verdict(reply)
        assert v["correct"] is False and v["answer"] is None and v["error"]

    def judge(prompts):  # corrections whose values no schema rule foresaw
        return ["SOLVABLE: yes\nCORRECT: no\nANSWER: [get_weather(city='Paris', days='" + "9" * 5000 + "')]",
                'SOLVABLE: yes\nCORRECT: no\nANSWER: [{"name": "get_weather", "arguments": "[1]"}]'][:len(prompts)]

    results = llm_stage([rec(call(days=2), rid="a"), rec(call(days=3), rid="b")], judge, rounds=1)
    assert [r[1][1] for r in results] == ["judge:correction-ast:type", "judge:correction-ast:not-a-call"]


# Mutated valid records: one value somewhere replaced by a wrong type, a huge value, deep nesting or odd
# unicode, or JSON text that Python's decoder refuses, spliced in.
_ODD_VALUE = st.one_of(
    st.sampled_from([None, True, 0, -1, 1.5, "", [], {}, [[]], {"a": {}}, "\ud800", "\x00", "\u202e", "\ufeff",
                     "é" * 50, "1" * 400, "1" * 5000, "1e400", "-0", 10 ** 30, ["city"], [["city"]], {"type": 5},
                     "[" * 300 + "]" * 300, "lambda:" * 3000, "[f(a=(((0,)*9**9,)*9**9,)*9**9)]"]),
    st.text(max_size=20), st.recursive(st.integers(), lambda v: st.lists(v, max_size=2), max_leaves=3))
_RAW_JSON = st.sampled_from(["1" * 5000, "[" * 5000 + "]" * 5000, "[" * 300 + "]" * 300, "NaN", "-Infinity",
                             '"\\ud800"', "1e400"])
_HERMES = {"id": "h", "tools": [WEATHER], "conversations": [
    {"from": "system", "value": "You can call tools."}, {"from": "human", "value": "weather in Paris"},
    {"from": "gpt", "value": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'}]}
_TOOLACE = {"id": "t", "system": "<tools>" + json.dumps([WEATHER]) + "</tools>", "conversations": [
    {"from": "user", "value": "weather"}, {"from": "assistant", "value": "[get_weather(city='Paris', days=2)]"}]}


def _paths(value, prefix=()):
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def _mutated_line(draw):
    xlam = _xlam_row(3)
    xlam_lists = {**xlam, "tools": json.loads(xlam["tools"]), "answers": json.loads(xlam["answers"])}
    base = draw(st.sampled_from([rec(call(days=2, tags=[1], where={"lat": 1})), xlam, xlam_lists, _HERMES, _TOOLACE]))
    record = {**json.loads(json.dumps(base)), "id": draw(st.integers(0, 10 ** 12))}  # mostly distinct ids
    for _ in range(draw(st.integers(1, 2))):
        paths = [p for p in _paths(record) if p]
        where = draw(st.sampled_from(paths))
        parent = record
        for k in where[:-1]:
            parent = parent[k]
        raw = draw(st.none() | _RAW_JSON)
        parent[where[-1]] = "@@RAW@@" if raw else draw(_ODD_VALUE)
    line = json.dumps(record)
    return line.replace('"@@RAW@@"', raw) if raw else line


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_mutated_line(), min_size=1, max_size=6))
def test_mutated_records_are_each_accounted_for_once(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_text("\n".join(lines) + "\n")
        stats = prepare([path], Path(tmp) / "out", progress=False)
        out = _outputs(Path(tmp) / "out")
        ids = [r["id"] for v in out.values() for r in v]
        assert stats["total"] == len(lines) == len(ids) == len(set(ids))
        assert all(r["reason"] and r["stage"] and isinstance(r["detail"], str) for r in out["rejects"])
        for name in ("train.jsonl", "val.jsonl"):  # what is kept, train.py can read
            if _lines(Path(tmp) / "out" / name):
                load_records(Path(tmp) / "out" / name)

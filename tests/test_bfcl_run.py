"""eval/bfcl.py: `run` end to end, the summary columns, `compare`, bad input, and the evaluation functions
train.py uses. Generation is either the tiny random model (garbage text) or a stand-in for model.sample.sample
that answers chosen texts, so the scoring is checked on known outputs."""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval.bfcl as bfcl
import model.sample
from data.calls import PromptFormat, format_calls, render_prompt
from eval.bfcl import (BFCLDataError, evaluate_bfcl, evaluate_records, find_data_dir, main, select_subset,
                       summarize)
from model.sample import Rollouts

PICK = {"simple_python": 3, "multiple": 2, "live_simple": 2, "irrelevance": 2, "live_relevance": 1}


def _shortest_lines(path: str, n: int) -> list[int]:
    with open(path) as f:
        lengths = [len(line) for line in f if line.strip()]
    return sorted(sorted(range(len(lengths)), key=lambda i: lengths[i])[:n])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A folder laid out like bfcl_eval/data holding a few short real items per category (questions and their
    possible answers copied line by line, so positions still pair them)."""
    src = find_data_dir()
    root = tmp_path_factory.mktemp("bfcl_data")
    os.makedirs(root / "possible_answer")
    for category, n in PICK.items():
        name = f"BFCL_v4_{category}.json"
        keep = _shortest_lines(os.path.join(src, name), n)
        for sub in ([".", "possible_answer"] if category not in bfcl.RELEVANCE_CATEGORIES else ["."]):
            with open(os.path.join(src, sub, name)) as f:
                lines = [line for line in f if line.strip()]
            (root / sub / name).write_text("".join(lines[i] for i in keep))
    return str(root)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny random model + byte tokenizer saved as a run checkpoint would be (with run_config.json)."""
    from model.tiny import byte_tokenizer, tiny_model
    path = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "run_config.json").write_text(json.dumps({"answer_format": "think", "tools_as": "python",
                                                      "prefill": "<think>", "lr": 1e-5}))
    return str(path)


def _right_text(item: dict) -> str:
    """A correct think-format answer for a BFCL item: the first allowed value of every non-omittable parameter."""
    if item["ground_truth"] is None:
        calls = [] if "irrelevance" in item["category"] else [{"name": item["function"][0]["name"], "arguments": {}}]
    else:
        calls = [{"name": name, "arguments": {p: allowed[0] for p, allowed in params.items() if allowed[0] != ""}}
                 for call in item["ground_truth"] for name, params in call.items()]
    answer = format_calls(calls) if calls else "No function applies."
    return f"<think>ok</think><answer>{answer}</answer>"


def _fake_sample(answer_for):
    """A stand-in for model.sample.sample: answer_for(prompt text) -> the completion the "model" writes for it.
    Like the real sampler it returns at most max_new_tokens ids, ending with EOS when the text is done, and picks up
    where a continued prompt (prompt + part of the completion) left off; a `stop` test is checked every
    `decode_chunk` tokens, as the real sampler does."""
    seen = []

    def sample(model, tokenizer, prompt_ids, max_new_tokens=256, stop=None, decode_chunk=16, **kwargs):
        completions, truncated = [], []
        for ids in prompt_ids:
            prompt = tokenizer.decode(ids)
            seen.append(prompt)
            full = answer_for(prompt)
            done = max(k for k in range(len(full) + 1) if prompt.endswith(full[:k]))  # already written
            rest = tokenizer(full[done:], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            n = min(len(rest), max_new_tokens)
            if stop is not None:
                n = 0
                while n < min(len(rest), max_new_tokens):
                    n = min(n + decode_chunk, len(rest), max_new_tokens)
                    if stop(rest[:n]):
                        break
            completions.append(rest[:n])
            truncated.append(rest[n - 1] != tokenizer.eos_token_id)
        n = len(completions)
        texts = [tokenizer.decode(c[:-1] if not t else c) for c, t in zip(completions, truncated)]
        return Rollouts(prompt_index=list(range(n)), completion_ids=completions, response_mask=torch.ones(n, 1),
                        truncated=truncated, sampler_logp=None, texts=texts)
    sample.seen = seen
    return sample


def _answers_by_question(items, prefill="<think>"):
    def answer_for(prompt):
        for it in items:
            if it["question"][-1]["content"] in prompt:
                assert "assistant\n" + prefill in prompt
                return _right_text(it)[len(prefill):]
        raise AssertionError("prompt of an unknown item")
    return answer_for


def _all_items(data_dir):
    return [it for c in PICK for it in bfcl.load_category(c, data_dir)]


# ----------------------------------------------------------------------------------------------------------

def test_summary_columns_hand_computed():
    acc = {"simple_python": 0.5, "multiple": 0.25, "parallel": 1.0, "parallel_multiple": 0.0,
           "live_simple": 0.5, "live_multiple": 0.25, "live_parallel": 1.0, "live_parallel_multiple": 0.0,
           "irrelevance": 0.9, "live_irrelevance": 0.7, "live_relevance": 0.5}
    full = {"live_simple": 258, "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24}
    per_category = {c: {"accuracy": a, "total": 50, "n_full": full.get(c, 200)} for c, a in acc.items()}
    s = summarize(per_category)
    assert s["non_live_ast"] == {"value": pytest.approx(1.75 / 4), "missing": []}  # unweighted over the 4 groups
    live = (0.5 * 258 + 0.25 * 1053 + 1.0 * 16 + 0.0 * 24) / (258 + 1053 + 16 + 24)  # weighted by full counts
    assert s["live"]["value"] == pytest.approx(live) and abs(live - 0.4375) > 0.1
    assert s["overall"]["value"] == pytest.approx((1.75 / 4 + live) / 2)
    assert s["irrelevance"]["value"] == pytest.approx(0.8) and s["relevance"]["value"] == 0.5
    # the evaluated (limited) counts do not change the weights
    assert summarize({c: {**r, "total": 7} for c, r in per_category.items()})["live"]["value"] == pytest.approx(live)
    # missing parts: mean of what is there, and listed
    part = summarize({"simple_python": {"accuracy": 0.6, "n_full": 400}, "parallel": {"accuracy": 0.2, "n_full": 200},
                      "live_multiple": {"accuracy": 0.3, "n_full": 1053}})
    assert part["non_live_ast"] == {"value": pytest.approx(0.4), "missing": ["multiple", "parallel_multiple"]}
    assert part["live"]["value"] == pytest.approx(0.3) and "live_simple" in part["live"]["missing"]
    assert part["overall"]["value"] == pytest.approx(0.35)
    assert part["relevance"] == {"value": None, "missing": ["live_relevance"]}


def test_subset_is_fixed_random_and_ordered():
    items = [{"id": str(i)} for i in range(100)]
    a, b = select_subset(items, 10), select_subset(items, 10)
    assert a == b and len(a) == 10 and [int(x["id"]) for x in a] == sorted(int(x["id"]) for x in a)
    assert a != items[:10]
    assert select_subset(items, None) == items and select_subset(items, 500) == items


def test_run_end_to_end_tiny_model(tiny_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    report = main(["run", "--model", tiny_dir, "--categories", "simple_python,multiple,irrelevance", "--limit", "2",
                   "--max-new-tokens", "3", "--batch-size", "2", "--out", out, "--data-dir", data_dir])
    printed = capsys.readouterr().out
    # settings come from the checkpoint's run_config.json, and are said
    assert "tools_as='python'" in printed and report["settings"]["tools_as"] == "python"
    assert report["settings"]["prefill"] == "<think>"
    for category in ("simple_python", "multiple", "irrelevance"):
        rows = [json.loads(line) for line in open(os.path.join(out, f"{category}_result.jsonl"))]
        assert len(rows) == 2 and all(set(r) == {"id", "result"} and r["result"].startswith("<think>") for r in rows)
        assert report["categories"][category]["total"] == 2
        # the result file re-scores to the same number with the `score` subcommand
        scored = main(["score", "--category", category, "--results", os.path.join(out, f"{category}_result.jsonl"),
                       "--data-dir", data_dir])
        assert scored["accuracy"] == report["categories"][category]["accuracy"]
    assert report["categories"]["simple_python"]["n_full"] == PICK["simple_python"]
    # garbage from a random model: wrong on AST categories, "no call" is right on irrelevance (BFCL's rule)
    assert report["categories"]["simple_python"]["accuracy"] == 0.0
    assert report["categories"]["irrelevance"]["accuracy"] == 1.0
    assert report["categories"]["irrelevance"]["strict_accuracy"] == 0.0  # no <answer> block
    assert report["summary"] == json.loads(json.dumps(summarize(report["categories"])))
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["summary"] == report["summary"] and on_disk["timing"]["items"] == 6
    assert on_disk["timing"]["items_per_s"] > 0
    md = open(os.path.join(out, "report.md")).read()
    assert "Non-Live AST" in md and "| simple_python | 2 |" in md and "weighted by each category's" in md
    # `report` rebuilds the same report from the result files, keeping the timings
    again = main(["report", out, "--data-dir", data_dir])
    assert again["categories"] == on_disk["categories"] and again["timing"] == on_disk["timing"]


def test_run_scores_right_and_wrong_answers(tiny_dir, data_dir, tmp_path, monkeypatch):
    items = _all_items(data_dir)
    monkeypatch.setattr(model.sample, "sample", _fake_sample(_answers_by_question(items)))
    out = str(tmp_path / "right")
    report = main(["run", "--model", tiny_dir, "--categories", ",".join(PICK), "--out", out, "--data-dir", data_dir,
                   "--batch-size", "3"])
    assert set(report["categories"]) == set(PICK)
    for category, r in report["categories"].items():
        assert (r["accuracy"], r["strict_accuracy"], r["total"]) == (1.0, 1.0, PICK[category]), category
    assert report["summary"]["non_live_ast"]["value"] == 1.0 and report["summary"]["relevance"]["value"] == 1.0
    assert report["settings"]["stop_when_settled"] is True  # (irrelevance's prose answers still run to </answer>)
    # empty and garbage completions: scored as wrong, no crash; irrelevance right (no call), relevance wrong
    garbage = iter(["", "((([[[<answer>", "\x00\ufffd" * 50, "[f(x=)]", "</think><answer>[[[</answer>"] * 10)
    monkeypatch.setattr(model.sample, "sample", _fake_sample(lambda p: next(garbage)))
    report = main(["run", "--model", tiny_dir, "--categories", ",".join(PICK), "--out", str(tmp_path / "bad"),
                   "--data-dir", data_dir, "--answer-format", "plain", "--prefill", ""])
    acc = {c: r["accuracy"] for c, r in report["categories"].items()}
    assert acc == {"simple_python": 0.0, "multiple": 0.0, "live_simple": 0.0, "irrelevance": 1.0,
                   "live_relevance": 0.0}
    assert report["settings"]["answer_format"] == "plain"  # flags win over run_config.json


def test_compare_table_and_png(tmp_path, capsys):
    def fake_report(name, accs):
        d = tmp_path / name
        d.mkdir()
        cats = {c: {"accuracy": a, "total": 10, "n_full": 100} for c, a in accs.items()}
        (d / "report.json").write_text(json.dumps({"categories": cats, "summary": summarize(cats)}))
        return str(d)
    a = fake_report("base", {"simple_python": 0.2, "live_simple": 0.1})
    b = fake_report("grpo", {"simple_python": 0.5, "live_simple": 0.3})
    c = fake_report("funrl", {"simple_python": 0.6, "live_simple": 0.2, "irrelevance": 0.9})
    png = str(tmp_path / "cmp.png")
    out = main(["compare", a, b, c, "--out", png])
    text = capsys.readouterr().out
    assert out["header"] == ["", "base", "grpo", "funrl", "Δ grpo", "Δ funrl"]
    assert "| simple_python | 20.00 | 50.00 | 60.00 | +30.00 | +40.00 |" in text
    assert "| Overall | 15.00 | 40.00 | 40.00 | +25.00 | +25.00 |" in text
    assert "| irrelevance | - | - | 90.00 | - | - |" in text
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(str(tmp_path / "cmp.md"))
    with pytest.raises(SystemExit, match="no report.json"):
        main(["compare", a, str(tmp_path)])


def test_bad_input_messages(tmp_path, data_dir, tiny_dir, monkeypatch):
    with pytest.raises(SystemExit, match="pip install --no-deps bfcl-eval"):
        main(["run", "--model", tiny_dir, "--categories", "simple_python", "--data-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="pip install --no-deps bfcl-eval"):  # data dir without that category
        main(["run", "--model", tiny_dir, "--categories", "parallel", "--data-dir", data_dir])
    with pytest.raises(SystemExit, match=r"unknown or unsupported category 'simple_cobol'; choose from: "
                                         r"simple_python, multiple, parallel"):
        main(["run", "--model", tiny_dir, "--categories", "simple_python,simple_cobol", "--data-dir", data_dir])
    # no package on the path at all
    monkeypatch.setattr(bfcl.sys, "path", [str(tmp_path)])
    monkeypatch.setattr(bfcl.site, "getsitepackages", lambda: [])
    monkeypatch.setattr(bfcl.site, "getusersitepackages", lambda: str(tmp_path))
    with pytest.raises(BFCLDataError, match="pip install --no-deps bfcl-eval"):
        find_data_dir()


def test_evaluate_records_and_bfcl(tiny_model, tiny_tokenizer, data_dir, monkeypatch):
    records = [{"id": "r0", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "category": "simple",
                "tools": [{"name": "get_weather", "description": "d", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
                "answers": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
               {"id": "r1", "messages": [{"role": "user", "content": "Tell me a joke."}], "category": "irrelevance",
                "tools": [{"name": "get_weather", "description": "d", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
                "answers": []}]
    # the real tiny model: garbage, scored, never a crash
    out = evaluate_records(tiny_model, tiny_tokenizer, records, PromptFormat(tools_as="python", prefill="<think>"),
                           max_new_tokens=4)
    assert out["total"] == 2 and out["correct"] == 0 and len(out["outputs"]) == 2
    assert [(v.id, v.correct) for v in out["verdicts"]] == [("r0", False), ("r1", False)]
    assert all(v.reason.startswith("format") for v in out["verdicts"])
    assert all(t.startswith("<think>") for t in out["outputs"])
    assert evaluate_records(tiny_model, tiny_tokenizer, [])["total"] == 0  # an empty shard on some rank
    # a model that always answers right scores 1.0 (the reward sees prefill + completion)
    right = {"Weather in Oslo?": "ok</think><answer>[get_weather(city='Oslo')]</answer>",
             "Tell me a joke.": "no tool</think><answer>None of the functions fits.</answer>"}
    monkeypatch.setattr(model.sample, "sample", _fake_sample(lambda p: next(v for k, v in right.items() if k in p)))
    out = evaluate_records(tiny_model, tiny_tokenizer, records, PromptFormat(prefill="<think>"))
    assert (out["correct"], out["total"]) == (2, 2)
    assert out["per_category"] == {"simple": [1, 1], "irrelevance": [1, 1]}
    assert out["verdicts"] == [bfcl.Verdict("val", "simple", "r0", True, "correct"),
                               bfcl.Verdict("val", "irrelevance", "r1", True, "correct")]

    # BFCL subsets: every item right -> 1.0; sharded over 2 ranks, the shards split the same fixed subset
    items = _all_items(data_dir)
    fake = _fake_sample(_answers_by_question(items))
    monkeypatch.setattr(model.sample, "sample", fake)
    reduced = []

    def all_reduce(t):
        reduced.append(t.clone())
        return t
    cats = ["simple_python", "live_relevance", "irrelevance"]
    for rank in (0, 1):  # this all_reduce does not sum, so each rank sees its own counts
        evaluate_bfcl(tiny_model, tiny_tokenizer, cats, limit=2, rank=rank, world=2, all_reduce=all_reduce,
                      prompt_format=PromptFormat(prefill="<think>"), data_dir=data_dir)
    totals = reduced[0] + reduced[1]  # [C, (correct, total)]
    assert reduced[0].dtype == torch.float64 and totals.tolist() == [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0]]
    first = list(fake.seen)
    fake.seen.clear()
    acc = evaluate_bfcl(tiny_model, tiny_tokenizer, cats, limit=2, prompt_format=PromptFormat(prefill="<think>"),
                        data_dir=data_dir)
    assert acc == {c: 1.0 for c in cats}
    assert sorted(fake.seen) == sorted(first)  # the same subset every call, and the shards cover it exactly once
    # garbage is wrong on AST and relevance, and right on irrelevance
    monkeypatch.setattr(model.sample, "sample", _fake_sample(lambda p: "<<garbage"))
    acc = evaluate_bfcl(tiny_model, tiny_tokenizer, cats, limit=2, prompt_format=PromptFormat(prefill="<think>"),
                        data_dir=data_dir)
    assert acc == {"simple_python": 0.0, "live_relevance": 0.0, "irrelevance": 1.0}
    # the per-item verdicts behind those accuracies (what train.py writes to eval_records/<tag>.jsonl)
    acc, verdicts = bfcl.evaluate_bfcl_verdicts(tiny_model, tiny_tokenizer, cats, limit=2,
                                                prompt_format=PromptFormat(prefill="<think>"), data_dir=data_dir)
    assert sorted((v.split, v.category, v.correct) for v in verdicts) == sorted(
        [("bfcl", "simple_python", False)] * 2 + [("bfcl", "live_relevance", False)] + [("bfcl", "irrelevance", True)] * 2)
    subset_ids = {it["id"] for c in cats for it in bfcl.select_subset(bfcl.load_category(c, data_dir), 2)}
    assert {v.id for v in verdicts} == subset_ids
    assert {v.reason for v in verdicts if v.correct} == {"correct"} and all(
        v.reason != "correct" for v in verdicts if not v.correct)


def test_verdicts_round_trip_and_a_bad_file_is_a_clear_error(tmp_path):
    verdicts = [bfcl.Verdict("val", "simple", "r0", True, "correct"),
                bfcl.Verdict("bfcl", "multiple", "multiple_3", False, "wrong_function")]
    bfcl.write_verdicts(tmp_path / "eval_records" / "after_rl.jsonl", verdicts)
    assert bfcl.read_verdicts(tmp_path / "eval_records" / "after_rl.jsonl") == verdicts
    assert not list((tmp_path / "eval_records").glob("*.tmp"))
    (tmp_path / "bad.jsonl").write_text('{"split": "val", "id": "r0", "correct": 1}\n')
    with pytest.raises(BFCLDataError, match="bad.jsonl:1 is not a verdict row"):
        bfcl.read_verdicts(tmp_path / "bad.jsonl")


def test_generate_texts_stop_at_answer(tiny_model, tiny_tokenizer, monkeypatch):
    prompts = [render_prompt(tiny_tokenizer, q, [], PromptFormat(tools_as="python", prefill="<think>"))
               for q in ("Weather?", "A longer question about the weather in Oslo?", "Hi")]
    one_pass = bfcl.generate_texts(tiny_model, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=3)
    # greedy with the stop test (never true for the random model's text): the same text as without it
    stopped = bfcl.generate_texts(tiny_model, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=2,
                                  stop_at_answer=True, prefill="<think>")
    assert stopped == one_pass and all(len(tiny_tokenizer(t).input_ids) == 5 for t in stopped)
    # a row that closes its <answer> stops (cut after it); the others run to max_new_tokens
    writes = {"Weather?": "x</think><answer>[f(a=1)]</answer> and then it goes on and on and on",
              "Hi": "</answer> is not an answer block <answer>[g()]</answer>tail"}
    fake = _fake_sample(lambda p: next((v for k, v in writes.items() if k in p), "ramble " * 20))
    monkeypatch.setattr(model.sample, "sample", fake)
    texts = bfcl.generate_texts(tiny_model, tiny_tokenizer, prompts, max_new_tokens=60, batch_size=3,
                                stop_at_answer=True, prefill="<think>")
    assert texts[0] == "x</think><answer>[f(a=1)]</answer>"
    assert texts[2] == "</answer> is not an answer block <answer>[g()]</answer>"
    assert texts[1] == ("ramble " * 20)[:60]


def test_generate_texts_stop_when_settled(tiny_model, tiny_tokenizer, data_dir, monkeypatch):
    """A row stops once its verdict can no longer change: a closed <answer>, or an open one that can no longer
    decode (prose); every verdict is the one of the text written to the end."""
    questions = ("Weather?", "Entropy?", "Cells?", "Loop?", "Hi")
    writes = {"Weather?": "x</think><answer>[f(a=1)]</answer> and then it goes on",
              "Entropy?": "Your reasoning</think><answer>The change in entropy is 100 J/Kg" + " * 100 J/Kg" * 30,
              "Cells?": "Thinking about cells and more cells" * 8,  # no <answer> yet: one may still come
              "Loop?": "r</think><answer>[mix(a='yellow', b='blue'" + ", 'red'" * 40,  # a call that may still close
              "Hi": "r</think><answer>\n\nThe possible answers are: " + "x, " * 60}
    prompts = [render_prompt(tiny_tokenizer, q, [], PromptFormat(tools_as="python", prefill="<think>"))
               for q in questions]
    fake = _fake_sample(lambda p: next(v for k, v in writes.items() if k in p))
    monkeypatch.setattr(model.sample, "sample", fake)
    full = bfcl.generate_texts(tiny_model, tiny_tokenizer, prompts, max_new_tokens=400, batch_size=3,
                               stop_at_answer=True, prefill="<think>")
    settled = bfcl.generate_texts(tiny_model, tiny_tokenizer, prompts, max_new_tokens=400, batch_size=3,
                                  stop_at_answer=True, stop_when_settled=True, prefill="<think>")
    assert full == [writes["Weather?"][:len("x</think><answer>[f(a=1)]</answer>")]] + [
        writes[q][:400] for q in questions[1:]]
    assert settled[0] == full[0] and settled[2] == full[2] and settled[3] == full[3]
    for i in (1, 4):  # prose answers stop within a check (16 tokens) of the second word of their answer
        assert full[i].startswith(settled[i]) and len(settled[i]) < full[i].index("<answer>") + 8 + 40
    items = _all_items(data_dir)
    for a, b in zip(full, settled):
        for item in items:
            assert bfcl.score_text("<think>" + a, item) == bfcl.score_text("<think>" + b, item)


_RESULT_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "</ans", "<", "The", " change", " is", " ", "\n",
                  "[f(a=1)]", "[f(a=", "1)", "]", "'", '"', "x", ", ", "(", ")", "You", "can", "`", "=", "10", "if"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_RESULT_PIECES), max_size=12).map("".join),
       st.lists(st.sampled_from(_RESULT_PIECES + ["answer>", "wer>", "[f(a=1)]</answer>"]), max_size=6).map("".join))
def test_settled_verdicts_never_change(text, rest):
    item = {"ground_truth": [{"f": {"a": [1]}}], "category": "simple",
            "function": [{"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}},
                                                      "required": ["a"]}}]}
    if bfcl.verdict_settled(text):
        assert bfcl.score_text(text + rest, item) == bfcl.score_text(text, item), (text, rest)
    irrelevance = dict(item, category="irrelevance", ground_truth=[])
    if bfcl.verdict_settled(text):
        assert bfcl.score_text(text + rest, irrelevance) == bfcl.score_text(text, irrelevance), (text, rest)


def test_prompt_format_comes_from_prompt_format_json_before_run_config(tmp_path, capsys):
    """A checkpoint's prompt_format.json decides; a directory of an older run has only run_config.json."""
    import argparse
    no_flags = argparse.Namespace(answer_format=None, tools_as=None, prefill=None)
    (tmp_path / "run_config.json").write_text(json.dumps({"answer_format": "think", "tools_as": "python",
                                                          "prefill": "<think>"}))
    assert bfcl.resolve_settings(no_flags, str(tmp_path)) == PromptFormat("think", "python", "<think>")
    (tmp_path / "prompt_format.json").write_text(PromptFormat("plain", "json", "").to_json())
    assert bfcl.resolve_settings(no_flags, str(tmp_path)) == PromptFormat("plain", "json", "")
    assert "prompt_format.json" in capsys.readouterr().out
    assert bfcl.resolve_settings(no_flags, None) == PromptFormat("think", "json", "<think>")

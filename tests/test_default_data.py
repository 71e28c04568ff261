"""The embedded default data: deterministic, valid, disjoint splits, no BFCL questions, an easy subset."""
import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from data.default import BANK, COUNTS, DEFAULT_DIR, POOLS, TOOLS, dumps, generate, load_default, main
from data.validate import CATEGORIES, check_structure, validate_record

BFCL_DATA = Path(__import__("bfcl_eval").__file__).parent / "data"


@pytest.fixture(scope="module")
def generated():
    return generate()


@pytest.fixture(scope="module")
def committed():
    return {split: load_default(split) for split in ("train", "val")}


def test_generation_is_deterministic_and_matches_the_committed_files(generated):
    for split in ("train", "val"):
        assert dumps(generated[split]) == (DEFAULT_DIR / f"{split}.jsonl").read_text(encoding="utf-8"), \
            f"data/default/{split}.jsonl is stale: run python -m data.default"
    assert dumps(generate()["val"]) == dumps(generated["val"])


def test_the_command_line_writes_where_asked_and_help_writes_nothing(tmp_path, capsys):
    mtimes = {s: (DEFAULT_DIR / f"{s}.jsonl").stat().st_mtime_ns for s in ("train", "val")}
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--out-dir" in capsys.readouterr().out
    main(["--out-dir", str(tmp_path / "out")])
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.jsonl").read_bytes() == (DEFAULT_DIR / f"{split}.jsonl").read_bytes()
        assert (DEFAULT_DIR / f"{split}.jsonl").stat().st_mtime_ns == mtimes[split]


def test_files_are_small():
    assert sum((DEFAULT_DIR / f"{s}.jsonl").stat().st_size for s in ("train", "val")) < 2_000_000


def test_every_record_is_canonical_and_passes_ast_validation(committed):
    for split, recs in committed.items():
        for i, rec in enumerate(recs, 1):
            assert rec["id"] == f"default-{split}-{i:05d}"
            check_structure(rec)
            answers = json.loads(json.dumps(rec["answers"]))
            assert validate_record(rec) == [], rec["id"]  # valid as is: no repair needed
            assert rec["answers"] == answers


def test_counts_and_category_coverage(committed):
    for split, recs in committed.items():
        mix = Counter((r["category"], r["difficulty"]) for r in recs)
        assert mix == Counter(COUNTS[split])
        assert {r["category"] for r in recs} == set(CATEGORIES)
        easy = sum(r["difficulty"] == "easy" for r in recs) / len(recs)
        assert 0.35 <= easy <= 0.45
    for r in committed["train"]:
        n_tools, n_calls = len(r["tools"]), len(r["answers"])
        assert {"simple": (n_tools, n_calls) == (1, 1), "multiple": 2 <= n_tools <= 4 and n_calls == 1,
                "parallel": n_tools == 1 and n_calls in (2, 3),
                "parallel_multiple": n_tools >= 2 and n_calls in (2, 3) and len({c["name"] for c in r["answers"]}) >= 2,
                "irrelevance": n_calls == 0 and n_tools >= 1}[r["category"]], r["id"]
        if r["category"] == "irrelevance":  # none of the offered tools is the one the query was written for
            assert r["messages"][0]["content"]


def _literal_in(value, query):
    if isinstance(value, list):
        return all(_literal_in(v, query) for v in value)
    return str(value) in query


def test_easy_subset_is_learnable(committed):
    """One tool, at most two arguments, all required, every value written verbatim in a short query."""
    easy = [r for r in committed["train"] if r["difficulty"] == "easy"]
    assert len(easy) >= 500 and len({r["answers"][0]["name"] for r in easy}) >= 30
    for r in easy:
        (call,) = r["answers"]
        query = r["messages"][0]["content"]
        assert len(r["tools"]) == 1 and len(query) <= 80
        assert 1 <= len(call["arguments"]) <= 2
        assert set(call["arguments"]) == set(r["tools"][0]["parameters"]["required"])
        assert all(_literal_in(v, query) for v in call["arguments"].values()), r["id"]


def test_reasoning_names_the_function_and_its_arguments(committed):
    for r in committed["train"] + committed["val"]:
        text = r["reasoning"]
        assert "<think>" not in text and text.endswith(".")
        for c in r["answers"]:
            assert c["name"] in text
            for k, v in c["arguments"].items():
                assert f"{k}={v!r}" in text, (r["id"], k)
        if not r["answers"]:
            assert "no call" in text


def test_train_and_val_are_disjoint(committed):
    def key(r):
        return json.dumps([sorted(t["name"] for t in r["tools"]), r["answers"]], sort_keys=True)

    train_q = {r["messages"][0]["content"].lower() for r in committed["train"]}
    val_q = {r["messages"][0]["content"].lower() for r in committed["val"]}
    assert len(train_q) == len(committed["train"]) and len(val_q) == len(committed["val"])  # no duplicates
    assert not train_q & val_q
    with_calls = [r for r in committed["train"] if r["answers"]]
    assert not {key(r) for r in with_calls} & {key(r) for r in committed["val"] if r["answers"]}
    # some templates are held out of training entirely
    held_out = {tpl for *_, templates in BANK if len(templates) >= 3 for tpl in [templates[-1][0]]}

    def matches(text, q):
        pattern = re.escape(text[0].upper() + text[1:]).replace(r"\{", "{").replace(r"\}", "}")
        return re.fullmatch(re.sub(r"{\w+}", ".+?", pattern), q) is not None

    val_held = sum(any(matches(t, r["messages"][0]["content"]) for t in held_out) for r in committed["val"])
    train_held = sum(any(matches(t, r["messages"][0]["content"]) for t in held_out)
                     for r in committed["train"] if r["category"] in ("simple", "multiple"))
    assert val_held >= 10 and train_held == 0


def _bfcl_questions():
    texts = set()
    for path in sorted(BFCL_DATA.glob("BFCL_v4_*.json")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            question = obj.get("question") if isinstance(obj, dict) else None
            for turn in question or []:
                for m in (turn if isinstance(turn, list) else [turn]):
                    if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                        texts.add(" ".join(m["content"].lower().split()))
    return texts


def test_no_bfcl_question_appears(committed):
    bfcl = _bfcl_questions()
    assert len(bfcl) > 3000  # the comparison really ran against BFCL's data
    ours = [" ".join(r["messages"][0]["content"].lower().split()) for r in committed["train"] + committed["val"]]
    assert not set(ours) & bfcl
    joined = "\n".join(ours)
    assert not [q for q in bfcl if len(q) >= 25 and q in joined]


def test_tool_bank_is_consistent():
    assert 30 <= len(TOOLS) <= 60 and len({t.name for t in TOOLS}) == len(TOOLS)
    fields = string.Formatter()
    for t in TOOLS:
        intent = {f for _, f, _, _ in fields.parse(t.intent) if f}
        assert intent == set(t.required), t.name  # parallel queries are built from intents
        for text, fixed in t.templates:
            placeholders = {f for _, f, _, _ in fields.parse(text) if f}
            assert set(t.required) <= placeholders | set(fixed), (t.name, text)
            for p in placeholders:
                assert t.pools[p] in POOLS, (t.name, p)


def test_load_default_rejects_unknown_split():
    with pytest.raises(ValueError, match="train"):
        load_default("test")


def test_reference_answers_earn_full_reward(committed):
    """The consumer's view: each record's own answer, written in the think/answer format, scores 1.0."""
    from data.calls import format_calls
    from rl.reward import reward
    for r in committed["train"][:400] + committed["val"]:
        text = f"<think>{r['reasoning']}</think><answer>{format_calls(r['answers'])}</answer>"
        assert reward(text, r) == (1.0, ""), r["id"]

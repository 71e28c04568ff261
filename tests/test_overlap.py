"""data/overlap.py: planted overlaps with a small BFCL-shaped folder are found per kind and category, listed,
counted in stats.json and on the console, dropped with --drop-bfcl-overlap; no BFCL data -> "not checked"."""
import json
from pathlib import Path

import pytest

from data.overlap import (NEAR_THRESHOLD, NGRAM_N, find_bfcl_data, load_bfcl_index, normalize_text,
                          record_overlaps, word_ngrams)
from data.prepare import main

PARALLEL_Q = ("I need the weather forecast for three cities this weekend: first Lisbon in Portugal, then Porto on "
              "the coast, and finally Faro in the Algarve region, all in Celsius please.")
CURRENCY = {"name": "convert_currency", "description": "Convert.", "parameters": {"type": "dict", "properties": {
    "amount": {"type": "float"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
    "required": ["amount", "from_currency", "to_currency"]}}
AREA = {"name": "geometry.area_triangle", "description": "Area.", "parameters": {"type": "dict", "properties": {
    "base": {"type": "integer"}, "height": {"type": "integer"}}, "required": ["base", "height"]}}


@pytest.fixture
def bfcl_dir(tmp_path):
    d = tmp_path / "bfcl"
    d.mkdir()
    rows = {
        "simple_python": [{"id": "simple_python_0", "question": [[{"role": "user", "content":
                           "Find the area of a triangle with a base of 10 units and height of 5 units."}]],
                           "function": [AREA]}],
        "parallel": [{"id": "parallel_0", "question": [[{"role": "user", "content": PARALLEL_Q}]],
                      "function": [{"name": "get_forecast", "description": "x", "parameters": {
                          "type": "dict", "properties": {"city": {"type": "string"}}}}]}],
        "irrelevance": [{"id": "irrelevance_0", "question": [[{"role": "user", "content": "Who wrote Hamlet?"}]],
                         "function": [CURRENCY]}],
    }
    for cat, items in rows.items():
        (d / f"BFCL_v4_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in items))
    (d / "BFCL_v4_format_sensitivity.json").write_text("{\n not json lines\n}\n")  # skipped, as in bfcl-eval
    return d


def rec(rid, text, tools, answers):
    return {"id": rid, "messages": [{"role": "user", "content": text}], "tools": tools, "answers": answers}


def canonical(tool):
    return {"name": tool["name"], "description": tool["description"], "parameters": {
        "type": "object", "properties": {k: {"type": {"float": "number", "integer": "integer"}.get(v["type"], "string")}
                                         for k, v in tool["parameters"]["properties"].items()},
        "required": tool["parameters"]["required"]}}


@pytest.fixture
def records(tmp_path):
    area = {**canonical(AREA), "name": "triangle_area"}  # another name: not a tool overlap
    currency = canonical(CURRENCY)
    currency_other = {**canonical(CURRENCY), "name": "convert_currency",
                      "parameters": {"type": "object", "properties": {"amount": {"type": "number"}},
                                     "required": ["amount"]}}
    forecast = {"name": "forecast", "description": "x", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}
    wrapped = "Hello there! " + PARALLEL_Q.replace("finally", "lastly") + " Thanks a lot."
    rows = [
        # planted: the same question, other case and punctuation
        rec("exact", "find the AREA of a triangle, with a base of 10 units and height of 5 units",
            [area], [{"name": "triangle_area", "arguments": {"base": 10, "height": 5}}]),
        # planted: BFCL's question wrapped in other sentences with one word changed
        rec("near", wrapped, [forecast], [{"name": "forecast", "arguments": {"city": "Lisbon"}}]),
        # planted: BFCL's function (name and parameter names), unrelated question
        rec("tool", "Convert 20 euros to yen.", [currency],
            [{"name": "convert_currency", "arguments": {"amount": 20, "from_currency": "EUR", "to_currency": "JPY"}}]),
        # not overlaps: same name with other parameters; a 7-word run shared with BFCL (shorter than an 8-gram)
        rec("same-name-other-params", "Convert 5 dollars.", [currency_other],
            [{"name": "convert_currency", "arguments": {"amount": 5}}]),
        rec("seven-words", "Need the weather forecast for three cities, says Bob.", [forecast],
            [{"name": "forecast", "arguments": {"city": "Rome"}}]),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_planted_overlaps_are_found_listed_and_counted(bfcl_dir, records, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--input", str(records), "--out", str(out), "--skip-llm", "--bfcl-data", str(bfcl_dir)])
    listing = {r["id"]: r for r in read_jsonl(out / "bfcl_overlap.jsonl")}
    assert set(listing) == {"exact", "near", "tool"}
    assert listing["exact"]["kinds"] == ["exact_text"]
    assert listing["exact"]["matches"][0]["bfcl_id"] == "simple_python_0"
    assert listing["near"]["kinds"] == ["near_text"]
    near = listing["near"]["matches"][0]
    assert near["category"] == "parallel" and NEAR_THRESHOLD <= near["score"] < 1.0
    assert listing["tool"]["kinds"] == ["same_tool"] and listing["tool"]["matches"][0]["category"] == "irrelevance"
    block = json.loads((out / "stats.json").read_text())["bfcl_overlap"]
    assert block["status"] == "checked" and block["ngram_n"] == NGRAM_N
    assert block["records"] == {"exact_text": 1, "near_text": 1, "same_tool": 1, "any": 3}
    assert block["by_category"]["parallel"]["near_text"] == 1
    assert block["by_category"]["simple_python"] == {"exact_text": 1, "near_text": 0, "same_tool": 0, "any": 1}
    assert block["by_category"]["irrelevance"]["same_tool"] == 1 and block["dropped"] == 0
    console = capsys.readouterr().out
    assert "3 records overlap BFCL" in console and "simple_python" in console
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"] + stats["val"] == 5  # reported, not dropped


def test_drop_moves_overlaps_to_rejects_and_a_rerun_stays_consistent(bfcl_dir, records, tmp_path):
    out = tmp_path / "out"
    base = ["--input", str(records), "--out", str(out), "--skip-llm", "--bfcl-data", str(bfcl_dir)]
    main(base)  # report first, then decide to drop: the same directory, no work redone
    main(base + ["--drop-bfcl-overlap"])
    kept = {r["id"] for name in ("train.jsonl", "val.jsonl") for r in read_jsonl(out / name)}
    rejects = {r["id"]: r for r in read_jsonl(out / "rejects.jsonl")}
    assert kept == {"same-name-other-params", "seven-words"}
    assert {k: r["reason"] for k, r in rejects.items()} == {"exact": "bfcl:exact_text", "near": "bfcl:near_text",
                                                            "tool": "bfcl:same_tool"}
    assert all(r["stage"] == "bfcl-overlap" and r["record"]["id"] == k for k, r in rejects.items())
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["train"] + stats["val"], stats["rejected"], stats["total"]) == (2, 3, 5)
    assert stats["bfcl_overlap"]["dropped"] == 3 and stats["bfcl_overlap"]["records"]["any"] == 3
    main(base + ["--drop-bfcl-overlap"])  # rerun: nothing moves twice, the report still lists them
    again = json.loads((out / "stats.json").read_text())
    assert (again["total"], again["rejected"], again["bfcl_overlap"]["dropped"]) == (5, 3, 3)
    assert len(read_jsonl(out / "rejects.jsonl")) == 3 and len(read_jsonl(out / "bfcl_overlap.jsonl")) == 3


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_without_bfcl_data_it_says_not_checked_never_zero(records, tmp_path, capsys, where):
    folder = tmp_path / "nothing"
    if where == "empty":
        folder.mkdir()
    out = tmp_path / "out"
    main(["--input", str(records), "--out", str(out), "--skip-llm", "--bfcl-data", str(folder),
          "--drop-bfcl-overlap"])
    block = json.loads((out / "stats.json").read_text())["bfcl_overlap"]
    assert block["status"] == "not checked" and "records" not in block and "dropped" not in block
    assert "not checked" in capsys.readouterr().out
    assert not (out / "bfcl_overlap.jsonl").exists()
    assert sum(len(read_jsonl(out / n)) for n in ("train.jsonl", "val.jsonl")) == 5


def test_ngrams_and_normalisation():
    assert normalize_text("  Hello,\tWORLD!! ｈｅｌｌｏ ") == "hello world hello"
    assert word_ngrams("a b c", n=2) == {"a b", "b c"} and word_ngrams("a b", n=3) == set()


def test_default_data_figures():
    """The figures the README gives for the embedded default data (bfcl-eval as pinned)."""
    from data.default import load_default
    data_dir = find_bfcl_data()
    assert data_dir is not None, "bfcl-eval is a test requirement"
    index = load_bfcl_index(data_dir)
    found = {split: [(r, record_overlaps(r, index)) for r in load_default(split)] for split in ("train", "val")}
    count = {split: {k: sum(any(m.kind == k for m in ms) for _, ms in rows)
                     for k in ("exact_text", "near_text", "same_tool")} for split, rows in found.items()}
    assert count == {"train": {"exact_text": 0, "near_text": 3, "same_tool": 112},
                     "val": {"exact_text": 0, "near_text": 0, "same_tool": 16}}
    tools = {(m.what, m.bfcl_id) for rows in found.values() for _, ms in rows for m in ms if m.kind == "same_tool"}
    assert tools == {("calculate_average", "simple_python_82"), ("calculate_average", "parallel_132"),
                     ("convert_currency", "irrelevance_216"), ("convert_currency", "irrelevance_234")}
    near = {r["messages"][0]["content"] for r, ms in found["train"] if any(m.kind == "near_text" for m in ms)}
    assert all(t.startswith("Find the greatest common divisor of 56 and") for t in near)

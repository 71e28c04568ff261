"""eval/bfcl.py: data loading and the `score` subcommand."""
import json
import os

import pytest

from eval.bfcl import CATEGORIES, BFCLDataError, find_data_dir, load_category, main, score_results

SIZES = {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "live_simple": 258,
         "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24, "irrelevance": 240,
         "live_irrelevance": 884, "live_relevance": 16}


def test_load_every_category():
    data_dir = find_data_dir()
    assert os.path.isdir(os.path.join(data_dir, "possible_answer"))
    for category in CATEGORIES:
        items = load_category(category, data_dir)
        assert len(items) == SIZES[category]
        it = items[0]
        assert it["id"].startswith(category) and it["category"] == category
        assert it["question"][-1]["role"] == "user" and isinstance(it["function"], list)
        assert (it["ground_truth"] is None) == ("relevance" in category)
    assert len(load_category("simple", limit=5)) == 5


def _write_data_dir(root, category="live_simple"):
    """A folder laid out like bfcl_eval/data with two entries."""
    tool = {"name": "get_time", "description": "d", "parameters": {"type": "dict", "required": ["city"],
                                                                    "properties": {"city": {"type": "string"}}}}
    entries = [{"id": f"{category}_{i}", "question": [[{"role": "user", "content": f"q{i}"}]], "function": [tool]}
               for i in range(2)]
    answers = [{"id": f"{category}_{i}", "ground_truth": [{"get_time": {"city": [c]}}]} for i, c in enumerate(["Tokyo", "Paris"])]
    os.makedirs(os.path.join(root, "possible_answer"))
    with open(os.path.join(root, f"BFCL_v3_{category}.json"), "w") as f:
        f.write("\n".join(json.dumps(e) for e in entries))
    with open(os.path.join(root, "possible_answer", f"BFCL_v3_{category}.json"), "w") as f:
        f.write("\n".join(json.dumps(a) for a in answers))
    return root


def _write_results(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_score_cli_with_data_dir(tmp_path, capsys):
    data = _write_data_dir(str(tmp_path / "data"))
    results = _write_results(tmp_path / "r.jsonl", [
        {"id": "live_simple_0", "result": "<think>Tokyo.</think><answer>[get_time(city='tokyo')]</answer>"},
        {"id": "live_simple_1", "result": "get_time(city='Rome')"}])
    out = main(["score", "--category", "live_simple", "--results", results, "--data-dir", data])
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed == out
    assert out["accuracy"] == 0.5 and out["correct"] == 1 and out["total"] == 2
    assert out["per_id"] == {"live_simple_0": True, "live_simple_1": False}


def test_score_real_data_plain_and_tagged():
    items = load_category("simple_python", limit=3)
    rows = [{"id": items[0]["id"], "result": "[calculate_triangle_area(base=10, height=5, unit='units')]"},
            {"id": items[1]["id"], "result": "```\nmath.factorial(number=5)\n```"},
            {"id": items[2]["id"], "result": "<think>x</think><answer>[math.hypot(x=4, y=6)]</answer>"}]
    out = score_results(items, rows)
    assert list(out["per_id"].values()) == [True, True, False] and out["reasons"] == {"wrong_value": 1}
    irr = load_category("irrelevance", limit=2)
    out = score_results(irr, [{"id": irr[0]["id"], "result": "None of the functions applies."},
                              {"id": irr[1]["id"], "result": "[determine_body_mass_index(weight=70, height=1.75)]"}])
    assert list(out["per_id"].values()) == [True, False]


def test_errors_are_clear(tmp_path):
    data = _write_data_dir(str(tmp_path / "data"))
    results = _write_results(tmp_path / "r.jsonl", [{"id": "nope_0", "result": "[]"}])
    with pytest.raises(SystemExit, match="not in category live_simple"):
        main(["score", "--category", "live_simple", "--results", results, "--data-dir", data])
    with pytest.raises(SystemExit, match="unknown or unsupported category 'simple_java'"):
        main(["score", "--category", "simple_java", "--results", results, "--data-dir", data])
    with pytest.raises(SystemExit, match=r"no BFCL_v\*_multiple.json"):
        main(["score", "--category", "multiple", "--results", results, "--data-dir", data])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["score", "--category", "live_simple", "--results", str(tmp_path / "missing.jsonl"), "--data-dir", data])
    dup = _write_results(tmp_path / "d.jsonl", [{"id": "live_simple_0", "result": "[]"}] * 2)
    with pytest.raises(SystemExit, match="twice"):
        main(["score", "--category", "live_simple", "--results", dup, "--data-dir", data])
    os.remove(os.path.join(data, "possible_answer", "BFCL_v3_live_simple.json"))
    with pytest.raises(BFCLDataError, match="ground truth"):
        load_category("live_simple", data)


def _score(tmp_path, results_path, capsys=None):
    data = os.path.join(tmp_path, "data")
    if not os.path.isdir(data):
        _write_data_dir(data)
    return main(["score", "--category", "live_simple", "--results", str(results_path), "--data-dir", data])


@pytest.mark.parametrize("content, message", [
    (b'{"id": ["live_simple_0"], "result": "[]"}\n', r":1 must be \{\"id\": \"<BFCL id>\""),
    (b'{"id": "live_simple_0", "result": [{"get_time": {"city": "Tokyo"}}]}\n', "both strings"),
    (b'{"id": "live_simple_0", "result": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", ":1: JSON nested too deeply"),
    (b'{"id": "live_simple_0", "result": "\xff"}\n', ":1: not UTF-8 text"),
    (b'{"id": "live_simple_0", "result": "[]"}\n{"id": ', ":2: not valid JSON"),
    (b"\n\n", "holds no results"),
])
def test_score_user_errors_are_one_line_messages(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=message) as e:
        _score(tmp_path, path)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_score_results_path_that_is_a_directory(tmp_path):
    with pytest.raises(SystemExit, match="is not a file; pass the results file"):
        _score(tmp_path, tmp_path)


def test_score_accepts_a_byte_order_mark_and_reports_coverage(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "live_simple_0", "result": "[get_time(city='Tokyo')]"}).encode()
                     + b"\n")
    out = _score(tmp_path, path)
    captured = capsys.readouterr()
    assert out["correct"] == out["total"] == 1 and out["items"] == 2 and out["coverage"] == 0.5
    assert "warning:" in captured.err and "1 of the 2 items" in captured.err
    with open(path, "a") as f:
        f.write(json.dumps({"id": "live_simple_1", "result": "[get_time(city='Rome')]"}) + "\n")
    out = _score(tmp_path, path)
    assert out["coverage"] == 1.0 and out["total"] == 2 and "warning" not in capsys.readouterr().err


def test_run_with_a_bad_model_is_a_one_line_message(tmp_path):
    data = _write_data_dir(str(tmp_path / "data"))
    os.makedirs(tmp_path / "not_a_model")
    for model in (str(tmp_path / "nowhere" / "model"), str(tmp_path / "not_a_model")):
        with pytest.raises(SystemExit, match="error: .*model") as e:
            main(["run", "--model", model, "--categories", "live_simple", "--data-dir", data,
                  "--out", str(tmp_path / "out")])
        assert "\n" not in str(e.value)

"""eval/track.py: train.py --report-to tensorboard writes event files that read back to the same rows as
metrics.jsonl, the resolved config and the samples table; --report-to wandb (a stub module standing in for the
package) receives the same; a missing package stops the run at once with what to install."""
import json
import sys
import types
from pathlib import Path

import pytest

from eval.track import numeric_items, open_tracker, samples_markdown


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from model.tiny import byte_tokenizer, tiny_model
    root = tmp_path_factory.mktemp("tiny") / "random"
    tok = byte_tokenizer()
    tiny_model(tok, seed=1).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    tools = [{"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "description": "X."}}, "required": ["x"]}}]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"x={i}"}],
                                        "tools": tools, "answers": [{"name": "f", "arguments": {"x": i}}],
                                        "category": "simple", "reasoning": "f"}) + "\n" for i in range(4)))
    return path


def train(model_dir, data, out, *extra):
    import train as train_module
    train_module.main(["--model", str(model_dir), "--train-data", str(data), "--val-data", str(data),
                       "--difficulty", "all", "--out-dir", str(out), "--max-new-tokens", "8", "--group-size", "2",
                       "--prompts-per-step", "2", "--eval-limit", "2", "--sft-steps", "2", "--sft-batch-size", "2",
                       "--steps", "2", "--sample-every", "1", "--save-every", "0", "--reward-mode", "graded", *extra])


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(rows: list[dict]) -> dict:
    """(name, step) -> value, as the tracker must log them."""
    out, last = {}, 0
    for row in rows:
        step = row.get("step", last)
        last = max(last, step)
        for name, value in numeric_items(row):
            out[(name, step)] = value
    return out


def test_tensorboard_event_files_read_back_to_the_metrics_rows(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    train(tiny_model_dir, tiny_data, run, "--report-to", "tensorboard")
    rows = metrics_rows(run)
    assert {r["phase"] for r in rows} == {"warmup", "rl", "summary"}
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    expected = expected_scalars(rows)
    assert len(expected) > 40 and set(logged) == set(expected)
    for key, value in expected.items():  # TensorBoard stores float32
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert ("rl/reward", 2) in logged and ("warmup/sft_nll", 0) in logged and ("rl/acc/simple", 1) in logged

    def texts(tag):
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]

    (step0, config_text), = texts("config/text_summary")
    assert step0 == 0 and json.loads(config_text.split("```json\n")[1].split("\n```")[0]) == \
        json.loads((run / "config.json").read_text())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    tables = dict(texts("samples/text_summary"))
    assert sorted(tables) == [1, 2]
    for step, table in tables.items():
        body = [line for line in table.splitlines()[2:]]
        assert len(body) == sum(s["step"] == step for s in samples) == 4
        assert all(line.count(" | ") == 5 for line in body)  # completions cannot break the table


def test_wandb_stub_receives_rows_config_and_samples(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    calls = {"log": [], "summary": {}, "define": [], "tables": []}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data
            calls["tables"].append(self)

    class Run:
        summary = calls["summary"]

        def define_metric(self, name, step_metric=None):
            calls["define"].append((name, step_metric))

        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Table=Table))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    train(tiny_model_dir, tiny_data, run, "--report-to", "wandb")
    assert calls["init"]["config"] == json.loads((run / "config.json").read_text())
    assert calls["init"]["dir"] == str(run) and calls.get("finished")
    assert ("rl/*", "rl/step") in calls["define"] and ("warmup/*", "warmup/step") in calls["define"]
    rows = metrics_rows(run)
    metric_logs = [d for d in calls["log"] if "samples" not in d]
    body = [r for r in rows if r["phase"] != "summary"]
    assert len(metric_logs) == len(body)
    for row, data in zip(body, metric_logs):
        assert data == {**dict(numeric_items(row)), f"{row['phase']}/step": row["step"]}
    summary_row = next(r for r in rows if r["phase"] == "summary")
    assert calls["summary"] == dict(numeric_items(summary_row))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    table_rows = [row for t in calls["tables"] for row in t.data]
    assert calls["tables"][0].columns == ["step", "id", "prompt", "completion", "reward", "reason"]
    assert table_rows == [[s["step"], s["id"], s["prompt"], s["completion"], s["reward"], s["reason"]]
                          for s in samples]


@pytest.mark.parametrize("kind,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_stops_at_once_with_what_to_install(kind, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=f"pip install {kind}"):
        open_tracker(kind, tmp_path, {})
    import train as train_module
    with pytest.raises(SystemExit, match=f"pip install {kind}"):  # before any model is loaded
        train_module.main(["--report-to", kind, "--out-dir", str(tmp_path / "run"), "--model", "/nonexistent"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_samples_table_escapes_cells():
    table = samples_markdown(3, [{"id": "a", "prompt": "p|q", "completion": "x\n| y\r\u2028z", "reward": 1.0,
                                  "reason": ""}])
    header, rule, row = table.splitlines()
    assert row.count(" | ") == 5 and "x<br>\\| y<br><br>z" in row and "p\\|q" in row


def test_none_logs_nothing_and_unknown_is_refused(tmp_path):
    tracker = open_tracker("none", tmp_path, {})
    tracker.log_row({"phase": "rl", "step": 1, "reward": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit, match="choose one of"):
        open_tracker("mlflow", tmp_path, {})

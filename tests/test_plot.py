"""eval/plot.py overlays a run written before reasons kept their full codes (one `reason/format`) with a run
written after (`reason/format:no_think`, ...)."""
import json

from eval.plot import plot_runs, read_metrics


def _run(path, reason_keys):
    path.mkdir()
    rows = [{"phase": "warmup", "step": 0, "sft_nll": 1.0}]
    rows += [{"phase": "rl", "step": s, "reward": 0.1 * s, "kl": 0.01, "cot_entropy": 0.5, "resp_len_mean": 30.0,
              "accuracy": 0.1 * s, "bonus": 0.02, **{k: 0.5 for k in reason_keys}} for s in (1, 2, 3)]
    rows += [{"phase": "summary", "eval/after_rl/val_accuracy": 0.5}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_old_and_new_reason_keys_plot_together(tmp_path):
    old = _run(tmp_path / "old", ["reason/format", "reason/correct"])
    new = _run(tmp_path / "new", ["reason/format:no_think", "reason/wrong_value", "reason/correct"])
    assert "reason/format" in read_metrics(old)[1] and "reason/format:no_think" in read_metrics(new)[1]
    out = plot_runs([old, new], tmp_path / "plots")
    assert out.is_file() and out.stat().st_size > 10_000

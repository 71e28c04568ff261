"""The GPU check's own logic, run on CPU at tiny sizes: every stage must end ok with its figures, the report
must be valid line by line even when the run is killed, and the budget must skip what does not fit."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval import gpucheck

ROOT = Path(__file__).resolve().parents[1]


def read_report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_every_stage_ok_with_figures_on_cpu_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.gpucheck", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_report(tmp_path)
    assert [r["stage"] for r in rows] == list(range(len(gpucheck.STAGES)))
    for r in rows:
        assert r["ok"] is True and r["skipped"] is None and r["error"] is None, r
        assert r["figures"].get("summary") and r["seconds"] > 0, r
    fig = {r["name"]: r["figures"] for r in rows}
    assert fig["environment"]["gemm_tflops"] > 0 and fig["environment"]["copy_gbs"] > 0
    assert fig["gpu-tests"]["cuda_tests_found"] >= 4 and fig["gpu-tests"]["unmarked"] == []
    assert fig["gpu-tests"]["triton_interpreter_passed"] == 1
    assert fig["head-kernel"]["V"] == 151665 and fig["head-kernel"]["head_rows"] == 151936
    assert fig["head-kernel"]["padded_rows_grad_max"] == 0.0 and fig["head-kernel"]["logp_rel_err"] < 1e-5
    assert {r["variant"] for r in fig["kernel-bench"]["results"]} >= {"naive", "chunked", "matmul"}
    assert fig["scoring"]["packed_float32_max_abs_diff"] < 2e-3
    assert fig["scoring"]["master_weights_moved_fraction"] > 0.5
    assert fig["grpo-step"]["small"]["updates"] == 1 and fig["grpo-step"]["big_scaled_to_full"]["peak_gib"] > 0
    assert fig["sampler"]["sampler_trainer_tok_per_s"] > 0 and fig["sampler"]["sampler_trainer_static_tok_per_s"] > 0
    assert fig["fsdp"]["param_max_abs_diff"] < 1e-5 and all(fig["fsdp"]["collectives"].values())
    assert fig["train-e2e"]["rl_steps"] == 2 and fig["train-e2e"]["head_rows"] == 151936
    table = proc.stdout[proc.stdout.rindex("stage  name"):]  # the summary table comes last
    assert all(f" {s.name} " in table for s in gpucheck.STAGES) and "FAIL" not in table


def test_a_killed_run_leaves_a_valid_report(tmp_path):
    """Stage 0 ends and is on disk before stage 5 starts; killing the run inside stage 5 loses only stage 5."""
    proc = subprocess.Popen([sys.executable, "-m", "eval.gpucheck", "--device", "cpu", "--tiny", "--out",
                             str(tmp_path), "--stages", "0,5"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    report = tmp_path / "report.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (report.exists() and report.read_text().endswith("\n")):
        assert proc.poll() is None, "the check ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = read_report(tmp_path)
    assert [r["name"] for r in rows] == ["environment"] and rows[0]["ok"] is True
    assert rows[0]["figures"]["gemm_tflops"] > 0


def test_the_budget_skips_stages_it_cannot_hold(tmp_path, capsys):
    rows = gpucheck.run_check(tmp_path, budget_s=0.0, stages=[0, 4], device=torch.device("cpu"), tiny=True)
    assert [r["ok"] for r in rows] == [None, None]
    assert all("budget" in r["skipped"] and r["figures"] == {} for r in rows)
    assert read_report(tmp_path) == json.loads(json.dumps(rows))
    assert "skip" in capsys.readouterr().out
    # a budget that holds stage 2's estimate runs it, then skips the rest
    est = gpucheck.STAGES[2].tiny_estimate_s
    rows = gpucheck.run_check(tmp_path, budget_s=est + 0.5, stages=[2, 8], device=torch.device("cpu"), tiny=True)
    assert rows[0]["ok"] is True and rows[1]["skipped"]
    assert len(read_report(tmp_path)) == 4  # appended to the earlier run's lines


def test_the_default_budget_holds_every_stage_and_the_readme_states_the_estimates():
    """Run with no --budget, no stage is skipped for its estimate; the README's table gives the code's estimates
    and their sum (a stage whose estimate grew once left the default budget short of the last stage)."""
    estimates = [s.h200_estimate_s for s in gpucheck.STAGES]
    assert gpucheck.default_budget_s(tiny=False) >= sum(estimates)
    assert gpucheck.default_budget_s(tiny=True) >= sum(s.tiny_estimate_s for s in gpucheck.STAGES)
    readme = (ROOT / "README.md").read_text()
    table = {}
    for i, stage in enumerate(gpucheck.STAGES):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {i} {stage.name} |"))
        table[stage.name] = float(row.rstrip(" |").rsplit("|", 1)[1].removesuffix(" s"))
    assert table == {s.name: s.h200_estimate_s for s in gpucheck.STAGES}
    assert f"The estimates ({sum(estimates):.0f} s in all; `--budget` defaults to them plus a tenth, " \
           f"{gpucheck.default_budget_s(tiny=False):.0f} s)" in readme


def test_stage_selection_and_its_errors():
    assert gpucheck._parse_stages("7,0,scoring") == [0, 4, 7]
    assert gpucheck._parse_stages(None) == list(range(len(gpucheck.STAGES)))
    with pytest.raises(SystemExit, match="unknown stage '9'"):
        gpucheck._parse_stages("9")
    with pytest.raises(SystemExit, match="--tiny"):
        gpucheck.main(["--device", "cpu", "--out", "unused"])


def test_every_cuda_test_carries_the_gpu_marker_and_a_reason():
    found = {t["test"]: t for t in gpucheck._tests_needing_cuda()}
    assert "test_sample.py::test_static_cache_compiled_on_cuda" in found
    assert "test_score.py::test_flash_attention_varlen_matches_padded_sdpa" in found
    for name, t in found.items():
        assert "gpu" in t["markers"], name
        assert t["skips_without_cuda"] and all(t["reasons"]), name


def test_the_cuda_test_scan_catches_an_unmarked_test(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import torch\n\ndef test_moves_to_gpu():\n    torch.zeros(2).to('cuda')\n\n"
        "def test_cpu_only():\n    torch.device('cuda')\n")
    monkeypatch.setattr(gpucheck, "ROOT", tmp_path)
    found = gpucheck._tests_needing_cuda()
    assert [t["test"] for t in found] == ["test_x.py::test_moves_to_gpu"] and found[0]["markers"] == []

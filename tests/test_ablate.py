"""eval/ablate.py: the bootstrap intervals on synthetic data with known answers, and the whole tool on the tiny
model (3 arms x 2 seeds x 1 RL step): runs, warm-up shared within a seed, report and figures, report.json equal to a
recomputation from the runs' own files, a second invocation that skips every finished run, an interrupted run
resumed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.ablate import (Run, estimate, main, mean_of_means, paired_differences, percentile_interval,
                         train_argv, two_level_bootstrap)
from eval.plot import ema
from tiny_run import ROOT

Z95 = 1.959964


# ----------------------------------------------------------------------------------------------------
# The intervals

def test_all_equal_values_give_a_zero_width_interval():
    groups = [np.full(n, 0.75) for n in (5, 8, 13)]
    est = estimate(groups, resamples=500)
    assert est.mean == est.low == est.high == 0.75
    est = estimate([np.ones(10)], resamples=500)  # one seed, all right
    assert (est.mean, est.low, est.high) == (1.0, 1.0, 1.0)


def test_one_seed_matches_the_normal_interval_of_a_proportion():
    """With one seed only the records are resampled: for n = 2,000 records of which 30% are right the interval is
    p +- 1.96 sqrt(p (1 - p) / n) (the normal approximation is excellent at this n)."""
    values = np.zeros(2000)
    values[:600] = 1.0
    est = estimate([values], resamples=20_000)
    half = Z95 * np.sqrt(0.3 * 0.7 / 2000)
    assert est.mean == pytest.approx(0.3)
    assert est.low == pytest.approx(0.3 - half, abs=0.003) and est.high == pytest.approx(0.3 + half, abs=0.003)


def test_seed_level_matches_the_normal_interval_of_seed_means():
    """Records all equal within each seed: only the seed level varies, and the interval is mean +- 1.96 sd / sqrt(S)
    (sd with ddof 0, the bootstrap's plug-in variance)."""
    rng = np.random.default_rng(3)
    seed_means = rng.normal(0.6, 0.1, size=60)
    groups = [np.full(20, m) for m in seed_means]
    est = estimate(groups, resamples=20_000)
    half = Z95 * seed_means.std() / np.sqrt(len(seed_means))
    assert est.mean == pytest.approx(seed_means.mean())
    assert est.low == pytest.approx(seed_means.mean() - half, rel=0, abs=0.1 * half)
    assert est.high == pytest.approx(seed_means.mean() + half, rel=0, abs=0.1 * half)


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """Synthetic ablations with a known true accuracy: each seed's accuracy is 0.7 + a seed effect N(0, 0.05), its 60
    records Bernoulli at that accuracy; 10 seeds. Over 300 such experiments the 95% interval covers 0.7 in about
    95% of them."""
    rng = np.random.default_rng(0)
    covered = 0
    for experiment in range(300):
        groups = [(rng.random(60) < np.clip(0.7 + rng.normal(0, 0.05), 0, 1)).astype(float) for _ in range(10)]
        est = estimate(groups, resamples=1000, seed=experiment)
        covered += est.low <= 0.7 <= est.high
    assert 0.90 <= covered / 300 <= 0.995, covered


def test_large_paired_difference_is_detected_and_pairing_narrows_the_interval():
    """Arm a right on 90% of the records, arm b on the same records' easy half plus 0%: a known difference of 0.4.
    The paired interval holds 0.4 and excludes 0; record difficulty shared by both arms cancels in the pairs, so the
    paired interval is narrower than the difference of the two arms' own intervals suggests."""
    rng = np.random.default_rng(1)
    a_runs, b_runs = [], []
    for _ in range(4):
        easy = rng.random(200) < 0.5
        a = {f"r{i}": float(e or rng.random() < 0.8) for i, e in enumerate(easy)}
        b = {f"r{i}": float(e) for i, e in enumerate(easy)}
        a_runs.append(a)
        b_runs.append(b)
    diffs = [paired_differences(a, b) for a, b in zip(a_runs, b_runs)]
    est = estimate(diffs)
    assert est.mean == pytest.approx(mean_of_means([np.array(list(a.values())) for a in a_runs])
                                     - mean_of_means([np.array(list(b.values())) for b in b_runs]))
    assert 0 < est.low <= 0.4 <= est.high < 0.55
    ea, eb = (estimate([np.array(list(r.values())) for r in runs]) for runs in (a_runs, b_runs))
    assert est.high - est.low < (ea.high - ea.low) + (eb.high - eb.low)


def test_paired_differences_align_by_id():
    assert list(paired_differences({"b": 1.0, "a": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0})) == [-1.0, 0.0]


def test_bootstrap_is_reproducible_and_checks_its_input():
    groups = [np.array([0.0, 1.0, 1.0]), np.array([1.0, 0.0])]
    assert np.array_equal(two_level_bootstrap(groups, 100, seed=5), two_level_bootstrap(groups, 100, seed=5))
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError):
        two_level_bootstrap([np.array([1.0]), np.array([])])


def test_ema_is_tensorboards_debiased_smoothing():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


# ----------------------------------------------------------------------------------------------------
# The tool on the tiny model

def test_each_arm_differs_only_in_its_flags_which_win_over_the_shared_ones(tmp_path):
    shared = ["--lr", "1e-5", "--entropy-coef", "0.2", "--steps", "30", "--eval-limit", "100"]
    argvs = {arm: train_argv(Run(arm, 1, tmp_path), shared, "simple_python", 5)
             for arm in ("funrl", "grpo", "warmup_only")}
    for arm, argv in argvs.items():
        # train.py lets the last occurrence of a flag win
        assert argv[:4] == ["--eval-limit", "1000000", "--eval-bfcl", "simple_python"]
        assert argv[6:6 + len(shared)] == shared
        assert argv[-4:] == ["--seed", "1", "--out-dir", str(tmp_path / arm / "seed1")]
    assert argvs["funrl"][6 + len(shared):-4] == []
    assert argvs["grpo"][6 + len(shared):-4] == ["--entropy-coef", "0"]
    assert argvs["warmup_only"][6 + len(shared):-4] == ["--steps", "0"]
    (tmp_path / "grpo" / "seed1").mkdir(parents=True)
    (tmp_path / "grpo" / "seed1" / "metrics.jsonl").write_text("")
    assert train_argv(Run("grpo", 1, tmp_path), shared, "", 5)[-2:] == ["--resume", "auto"]


ARMS = ["funrl", "warmup_only"]


def _flags(tiny_dir, tiny_data):
    return ["--model", str(tiny_dir), "--train-data", str(tiny_data), "--val-data", str(tiny_data),
            "--difficulty", "all", "--max-new-tokens", "24", "--group-size", "4", "--prompts-per-step", "2",
            "--sft-steps", "1", "--sft-batch-size", "2", "--steps", "1", "--lr", "1e-3", "--reward-mode", "graded",
            "--sample-every", "1"]


def _ablate(out, tiny_dir, tiny_data, *extra):
    cmd = [sys.executable, "-m", "eval.ablate", "--arms", ",".join(ARMS), "--seeds", "2", "--out", str(out),
           "--jobs", "2", "--bfcl-categories", "simple_python", "--bfcl-limit", "2", *extra,
           *_flags(tiny_dir, tiny_data)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ablation(tiny_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "A"
    return out, _ablate(out, tiny_dir, tiny_data)


def _records(run: Path, tag: str) -> dict[str, dict[str, float]]:
    by_measure = {}
    for line in (run / "eval_records" / f"{tag}.jsonl").read_text().splitlines():
        row = json.loads(line)
        measure = "val" if row["split"] == "val" else f"bfcl/{row['category']}"
        by_measure.setdefault(measure, {})[row["id"]] = float(row["correct"])
    return by_measure


def test_every_run_is_a_train_run_and_the_rl_arms_start_from_the_seeds_warmup(ablation):
    out, console = ablation
    for arm in ARMS:
        for seed in (0, 1):
            run = out / arm / f"seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["seed"] == seed and config["eval_limit"] >= 6 and config["eval_bfcl_limit"] == 2
            assert config["entropy_coef"] == 0.4
            assert config["steps"] == (0 if arm == "warmup_only" else 1)
            assert (run / "summary.json").is_file()
            assert len(_records(run, "before")["val"]) == 6  # the whole validation split
            if arm != "warmup_only":
                control = out / "warmup_only" / f"seed{seed}"
                assert os.path.samefile(run / "warmup" / "model.safetensors",
                                        control / "warmup" / "model.safetensors")
                log = (out / "logs" / f"{arm}-seed{seed}.log").read_text()
                assert "continuing from warmup/" in log
                assert "[eval] after_warmup" not in log  # the control's evaluation of the same policy is reused
                assert _records(run, "after_warmup") == _records(control, "after_warmup")
                assert f"{arm}/seed{seed}: starts from the warm-up of warmup_only/seed{seed}" in console
                summary, control_summary = (json.loads((r / "summary.json").read_text()) for r in (run, control))
                for key in ("eval/before/val_accuracy", "eval/after_warmup/val_accuracy",
                            "eval/after_warmup/bfcl_simple_python"):
                    assert summary[key] == control_summary[key], key
                rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                assert [r["phase"] for r in rows] == ["warmup", "rl", "summary"]


def test_report_and_figures_are_written(ablation):
    out, console = ablation
    md = (out / "report.md").read_text()
    assert "| funrl - warmup_only |" in md and "held-out (N=6)" in md and "simple_python (N=2)" in md
    for png in ("accuracy.png", "curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 300_000, (png, len(data))
    assert "report.md" in console and "[ablate] funrl: held-out" in console


def test_report_json_equals_a_recomputation_from_the_runs_files(ablation):
    out, _ = ablation
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and report["missing_runs"] == []
    assert report["measures"] == {"val": {"label": "held-out", "n": [6]},
                                  "bfcl/simple_python": {"label": "simple_python", "n": [2]}}
    resamples, seed = report["bootstrap"]["resamples"], report["bootstrap"]["seed"]
    records = {}
    for arm in ARMS:
        for s in (0, 1):
            run = out / arm / f"seed{s}"
            tag = "after_warmup" if arm == "warmup_only" else "after_rl"
            summary = json.loads((run / "summary.json").read_text())
            records[arm, s] = _records(run, tag)
            assert summary[f"eval/{tag}/val_accuracy"] == np.mean(list(records[arm, s]["val"].values()))
            assert summary[f"eval/{tag}/bfcl_simple_python"] == np.mean(
                list(records[arm, s]["bfcl/simple_python"].values()))
    for arm in ARMS:
        for measure, key in (("val", "val_accuracy"), ("bfcl/simple_python", "bfcl_simple_python")):
            entry = report["accuracy"][arm][measure]
            tag = "after_warmup" if arm == "warmup_only" else "after_rl"
            per_seed = [json.loads((out / arm / f"seed{s}" / "summary.json").read_text())[f"eval/{tag}/{key}"]
                        for s in (0, 1)]
            assert [r["accuracy"] for r in entry["per_seed"]] == per_seed
            assert [r["n"] for r in entry["per_seed"]] == [len(records[arm, s][measure]) for s in (0, 1)]
            assert entry["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
            groups = [np.array(list(records[arm, s][measure].values())) for s in (0, 1)]
            assert entry["ci"] == list(percentile_interval(two_level_bootstrap(groups, resamples, seed)))
    assert list(report["differences"]) == ["funrl - warmup_only"]
    for a, b in [("funrl", "warmup_only")]:
        for measure in ("val", "bfcl/simple_python"):
            entry = report["differences"][f"{a} - {b}"][measure]
            diffs = [np.array([records[a, s][measure][i] - records[b, s][measure][i]
                               for i in sorted(records[a, s][measure])]) for s in (0, 1)]
            assert [r["difference"] for r in entry["per_seed"]] == pytest.approx([d.mean() for d in diffs])
            assert entry["mean"] == pytest.approx(np.mean([d.mean() for d in diffs]), abs=1e-12)
            assert entry["ci"] == list(percentile_interval(two_level_bootstrap(diffs, resamples, seed)))


def test_second_invocation_skips_finished_runs_and_resumes_an_interrupted_one(ablation, tiny_dir, tiny_data):
    out, _ = ablation
    runs = [out / arm / f"seed{s}" for arm in ARMS for s in (0, 1)]
    interrupted = out / "funrl" / "seed1"
    summary = (interrupted / "summary.json").read_text()
    (interrupted / "summary.json").unlink()  # as if killed after its last checkpoint
    before = {p: p.stat().st_mtime_ns for run in runs if run != interrupted for p in run.rglob("*") if p.is_file()}
    logs = {p: p.stat().st_size for p in (out / "logs").iterdir() if "funrl-seed1" not in p.name}
    report = json.loads((out / "report.json").read_text())
    console = _ablate(out, tiny_dir, tiny_data)
    assert console.count("finished (summary.json), skipped") == 3
    assert "funrl/seed1: resuming" in console and console.count("resuming") == 1 and "starting" not in console
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no finished run was touched
    assert {p: p.stat().st_size for p in logs} == logs  # and none of their train.py processes ran
    assert json.loads((interrupted / "summary.json").read_text()) == json.loads(summary)
    assert json.loads((out / "report.json").read_text()) == report


def test_mistakes_are_one_line_errors(ablation, tiny_dir, tiny_data, capsys):
    out, _ = ablation
    for argv, message in [
        (["--arms", "funrl,ppo", "--out", str(out / "x")], "--arms: unknown arm ppo"),
        (["--out", str(out / "x"), "--seed", "3"], "--seed is set per run by eval.ablate"),
        (["--out", str(out / "x"), "--bfcl-categories", "simple_pyton"], "unknown or unsupported category"),
        (["--out", str(out), "--bfcl-categories", "simple_python", "--bfcl-limit", "2", "--lr", "5e-3"],
         "holds runs made with other settings"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    assert not (out / "x").exists()

"""The paper's central ablation: FunRL vs plain GRPO vs the supervised warm-up alone, paired by seed, with
bootstrap confidence intervals.

    python -m eval.ablate --arms funrl,grpo,warmup_only --seeds 3 --out runs/ablate [--jobs 2]
        [--bfcl-categories simple_python,multiple,parallel,parallel_multiple] [--bfcl-limit 20] [train.py flags]

Every arm x seed is a train.py run directory DIR/<arm>/seed<S>, started as a subprocess
(`python train.py [train.py flags] [arm flags] --seed S --out-dir DIR/<arm>/seed<S>`, console in
DIR/logs/<arm>-seed<S>.log). The arms differ only in their flags:
    funrl        none: train.py's defaults (the entropy bonus, lambda 0.4)
    grpo         --entropy-coef 0 (plain GRPO, the paper's baseline)
    warmup_only  --steps 0 (the supervised warm-up alone: the control that shows what RL adds)
Paired by seed: train.py derives the data order and every rollout's sampling from --seed, and the RL arms of a
seed start from the very warm-up of that seed's warmup_only run (its verified warmup/ policy is linked into their
run directory, which train.py --resume auto continues from; --no-share-warmup runs the warm-up in every run).
Every run evaluates on the whole validation split (--eval-limit 1000000 unless given) and on a fixed seeded BFCL
subset (--bfcl-limit items per category); train.py writes each record's verdict to eval_records/<tag>.jsonl.
Resumable: finished runs (summary.json) are skipped, interrupted ones continue with --resume auto. --jobs J runs J
at once, each with cores // J torch threads.

Then it writes DIR/report.json, DIR/report.md, DIR/accuracy.png and DIR/curves.png: per arm the accuracy of
each seed (after RL; after the warm-up for warmup_only), their mean and a 95% interval from a two-level bootstrap
(seeds, then records within each seed), the paired differences between arms (paired by seed and record), and the
training curves of the arms overlaid (EMA-smoothed mean over seeds, each seed as a thin line).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.bfcl import BFCLDataError, parse_categories, read_verdicts
from eval.plot import bar_chart, ema, read_metrics
from model.checkpoint import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
ARM_FLAGS = {"funrl": [], "grpo": ["--entropy-coef", "0"], "warmup_only": ["--steps", "0"]}
CONTROL = "warmup_only"
PAIRS = [("funrl", "grpo"), ("funrl", "warmup_only"), ("grpo", "warmup_only")]  # differences reported: a - b
ALL_RECORDS = 1_000_000  # the --eval-limit that keeps the whole validation split
RESERVED = ("--out-dir", "--seed", "--resume")  # set per run by this tool
CURVES = [("reward", "reward (mean)"), ("kl", "KL to reference (k3)"), ("cot_entropy", "<think> token entropy"),
          ("bonus", "entropy bonus (mean)"), ("resp_len_mean", "response length (tokens)"),
          ("zero_var_frac", "zero-variance groups (fraction)")]
RESAMPLES, BOOTSTRAP_SEED, LEVEL = 10_000, 0, 0.95


# ----------------------------------------------------------------------------------------------------
# Intervals: small pure functions over per-seed arrays of per-record values (1/0 correctness, or paired
# differences -1/0/1)

def mean_of_means(groups: list[np.ndarray]) -> float:
    """The estimate: the mean over seeds of each seed's mean over its records (every seed weighs the same)."""
    return float(np.mean([np.mean(g) for g in groups]))


def two_level_bootstrap(groups: list[np.ndarray], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Bootstrap replicates of mean_of_means: each replicate draws len(groups) seeds with replacement, then, within
    each drawn seed, as many records as it has, with replacement. -> [resamples] replicate values."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("every group needs at least one value")
    picks = rng.integers(len(groups), size=(resamples, len(groups)))  # which seed fills each slot
    slot_means = np.empty(picks.shape)
    for s, values in enumerate(groups):
        slots = picks == s
        draws = rng.integers(values.size, size=(int(slots.sum()), values.size))
        slot_means[slots] = values[draws].mean(axis=1)
    return slot_means.mean(axis=1)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the replicates (the percentile bootstrap interval)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float


def estimate(groups: list[np.ndarray], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
             level: float = LEVEL) -> Estimate:
    """mean_of_means with its two-level percentile bootstrap interval."""
    low, high = percentile_interval(two_level_bootstrap(groups, resamples, seed), level)
    return Estimate(mean_of_means(groups), low, high)


def paired_differences(a: dict[str, float], b: dict[str, float]) -> np.ndarray:
    """a[id] - b[id] over the ids both hold, in sorted id order (one seed's records, two arms)."""
    ids = sorted(set(a) & set(b))
    return np.array([a[i] - b[i] for i in ids], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# Running the arms

@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    out: Path  # the ablation directory

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def path(self) -> Path:
        return self.out / self.arm / f"seed{self.seed}"

    @property
    def log(self) -> Path:
        return self.out / "logs" / f"{self.arm}-seed{self.seed}.log"

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").is_file()

    @property
    def started(self) -> bool:
        return any((self.path / name).exists() for name in ("metrics.jsonl", "warmup", "checkpoints"))


def train_argv(run: Run, train_flags: list[str], bfcl_categories: str, bfcl_limit: int) -> list[str]:
    """train.py's arguments for a run: the ablation's evaluation defaults, the shared train.py flags (which may
    override those), the arm's flags, then the seed and the run directory (and --resume auto if it has begun)."""
    defaults = ["--eval-limit", str(ALL_RECORDS)]
    if bfcl_categories:
        defaults += ["--eval-bfcl", bfcl_categories, "--eval-bfcl-limit", str(bfcl_limit)]
    argv = [*defaults, *train_flags, *ARM_FLAGS[run.arm], "--seed", str(run.seed), "--out-dir", str(run.path)]
    return argv + (["--resume", "auto"] if run.started else [])


def link_or_copy(src, dst) -> None:
    """Hard-link a file (the warm-up policy is only ever read), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def start_from_warmup(run: Run, source: Run) -> bool:
    """Make run's directory a copy of `source` up to the end of its warm-up (its verified warmup/ policy, warm-up
    metrics rows, the evaluations before and after the warm-up and their verdicts), built aside and renamed, so
    that train.py --resume auto continues from warmup/ without evaluating the warm-up again. False (nothing written) when there is no verified warm-up to start from."""
    warm = source.path / "warmup"
    if run.path.exists() or not source.finished or checkpoint_problem(warm) is not None:
        return False
    tmp = run.path.with_name(run.path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(warm, tmp / "warmup", copy_function=link_or_copy)
    rows = [line for line in (source.path / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("phase") == "warmup"]
    (tmp / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    evals = json.loads((source.path / "evals.json").read_text())
    (tmp / "evals.json").write_text(json.dumps(
        {k: v for k, v in evals.items() if k.startswith(("eval/before/", "eval/after_warmup/"))}, indent=1))
    (tmp / "eval_records").mkdir()
    for tag in ("before", "after_warmup"):  # the same policy, records and greedy decoding: the same verdicts
        if (source.path / "eval_records" / f"{tag}.jsonl").is_file():
            shutil.copy2(source.path / "eval_records" / f"{tag}.jsonl", tmp / "eval_records" / f"{tag}.jsonl")
    tmp.rename(run.path)
    return True


@dataclass
class Scheduler:
    """Runs train.py for each run, `jobs` at a time, each with `threads` torch threads."""
    train_flags: list[str]
    bfcl_categories: str
    bfcl_limit: int
    jobs: int
    share_warmup: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, message: str) -> None:
        with self.lock:
            print(f"[ablate] {message}", flush=True)

    @property
    def threads(self) -> int:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.jobs)

    def execute(self, run: Run, source: Run | None, source_done: concurrent.futures.Future | None) -> int:
        """One run to its end; returns train.py's exit status (0 for a run already finished)."""
        if run.finished:
            self.say(f"{run.name}: finished (summary.json), skipped")
            return 0
        if source_done is not None:
            source_done.result()  # the control run of this seed, submitted (so started) before this one
            if start_from_warmup(run, source):
                self.say(f"{run.name}: starts from the warm-up of {source.name}")
        argv = train_argv(run, self.train_flags, self.bfcl_categories, self.bfcl_limit)
        self.say(f"{run.name}: {'resuming' if run.started else 'starting'} ({self.threads} threads), "
                 f"log {run.log}")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        run.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(run.log, "a") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} python train.py {shlex.join(argv)}\n")
            log.flush()
            code = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        self.say(f"{run.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.time() - t0:.0f} s")
        return code

    def run_all(self, runs: list[Run]) -> list[Run]:
        """Every run (the control runs first, so the others can start from their warm-up); -> the failed ones."""
        order = [r for r in runs if r.arm == CONTROL] + [r for r in runs if r.arm != CONTROL]
        controls = {r.seed: r for r in runs if r.arm == CONTROL} if self.share_warmup else {}
        futures: dict[Run, concurrent.futures.Future] = {}
        # a pool runs tasks in submission order, so a run only ever waits for one that has already started
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for run in order:
                source = controls.get(run.seed) if run.arm != CONTROL else None
                futures[run] = pool.submit(self.execute, run, source, futures.get(source))
        return [run for run in order if futures[run].result() != 0]


# ----------------------------------------------------------------------------------------------------
# Reading the runs and the report

@dataclass
class RunOutcome:
    """What one finished run scored on its final evaluation: per measure ("val", "bfcl/<category>") the summary's
    accuracy and each record's verdict (1.0 right, 0.0 wrong)."""
    arm: str
    seed: int
    path: Path
    evaluation: str  # the eval tag scored: after_rl, or after_warmup for a run without RL steps
    accuracy: dict[str, float]
    records: dict[str, dict[str, float]]  # measure -> {record id: 1.0 / 0.0}
    after_warmup: float | None  # held-out accuracy after the warm-up (the same for every arm of a seed)


def final_evaluation(config: dict) -> str:
    if config.get("steps", 0) > 0:
        return "after_rl"
    return "after_warmup" if config.get("sft_steps", 0) > 0 else "before"


def summary_key(evaluation: str, measure: str) -> str:
    return f"eval/{evaluation}/val_accuracy" if measure == "val" else \
        f"eval/{evaluation}/bfcl_{measure.removeprefix('bfcl/')}"


def read_outcome(run: Run) -> RunOutcome:
    """A finished run's final evaluation from its own files (config.json, summary.json, eval_records/); a
    verdict file that disagrees with summary.json is an error."""
    try:
        config = json.loads((run.path / "config.json").read_text())
        summary = json.loads((run.path / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {run.path}: unreadable config.json or summary.json ({e}); rerun it") from None
    evaluation = final_evaluation(config)
    path = run.path / "eval_records" / f"{evaluation}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run.path} has no per-record verdicts ({path.name}): it was run by an older "
                         "train.py; remove the run directory and run again")
    try:
        verdicts = read_verdicts(path)
    except BFCLDataError as e:
        raise SystemExit(f"error: {e}") from None
    records: dict[str, dict[str, float]] = {}
    for v in verdicts:
        records.setdefault("val" if v.split == "val" else f"bfcl/{v.category}", {})[v.id] = float(v.correct)
    accuracy = {}
    for measure, by_id in records.items():
        key = summary_key(evaluation, measure)
        accuracy[measure] = summary.get(key)
        if accuracy[measure] is None or abs(float(np.mean(list(by_id.values()))) - accuracy[measure]) > 1e-9:
            raise SystemExit(f"error: {path} disagrees with {key} of summary.json; rerun the run "
                             "(remove its directory)")
    return RunOutcome(run.arm, run.seed, run.path, evaluation, accuracy, records,
                      summary.get("eval/after_warmup/val_accuracy"))


def measure_label(measure: str) -> str:
    return "held-out" if measure == "val" else measure.removeprefix("bfcl/")


def build_report(outcomes: list[RunOutcome], arms: list[str], missing: list[str], command: str,
                 train_flags: list[str]) -> dict:
    """report.json's content: per arm and measure the per-seed accuracies, their mean and interval; the paired
    differences; the after-warm-up check. Every number is recomputable from the runs' files (see read_outcome)."""
    by_arm = {arm: sorted((o for o in outcomes if o.arm == arm), key=lambda o: o.seed) for arm in arms}
    measures = list(dict.fromkeys(m for o in outcomes for m in o.records))
    report = {"command": command, "train_flags": train_flags,
              "arms": {arm: ARM_FLAGS[arm] for arm in arms}, "seeds": sorted({o.seed for o in outcomes}),
              "missing_runs": missing,
              "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "level": LEVEL,
                            "method": "percentile interval of the mean over seeds; each replicate resamples the "
                                      "seeds, then the records within each drawn seed"},
              "measures": {m: {"label": measure_label(m),
                               "n": sorted({len(o.records[m]) for o in outcomes if m in o.records})}
                           for m in measures},
              "accuracy": {}, "differences": {}, "after_warmup": []}
    for arm, runs in by_arm.items():
        report["accuracy"][arm] = {}
        for m in measures:
            have = [o for o in runs if m in o.records]
            if not have:
                continue
            est = estimate([np.array(list(o.records[m].values())) for o in have])
            report["accuracy"][arm][m] = {
                "evaluation": sorted({o.evaluation for o in have}),
                "per_seed": [{"seed": o.seed, "accuracy": o.accuracy[m], "n": len(o.records[m])} for o in have],
                "mean": est.mean, "ci": [est.low, est.high]}
    for a, b in PAIRS:
        if a not in arms or b not in arms:
            continue
        name = f"{a} - {b}"
        report["differences"][name] = {}
        for m in measures:
            pairs = [(oa, ob) for oa in by_arm[a] for ob in by_arm[b]
                     if oa.seed == ob.seed and m in oa.records and m in ob.records]
            groups = [paired_differences(oa.records[m], ob.records[m]) for oa, ob in pairs]
            if not groups or any(g.size == 0 for g in groups):
                continue
            est = estimate(groups)
            report["differences"][name][m] = {
                "per_seed": [{"seed": oa.seed, "difference": float(g.mean()), "n_pairs": int(g.size)}
                             for (oa, _), g in zip(pairs, groups)],
                "mean": est.mean, "ci": [est.low, est.high]}
    for seed in report["seeds"]:
        report["after_warmup"].append({"seed": seed, **{o.arm: o.after_warmup for o in outcomes if o.seed == seed}})
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report_markdown(report: dict) -> str:
    measures = list(report["measures"])
    header = ["arm"] + [f"{report['measures'][m]['label']} (N={'/'.join(map(str, report['measures'][m]['n']))})"
                        for m in measures]
    level = int(round(report["bootstrap"]["level"] * 100))
    lines = ["# FunRL vs GRPO vs warm-up only", "", f"`{report['command']}`", "",
             f"Seeds: {', '.join(map(str, report['seeds']))}. Arms and their flags: "
             + "; ".join(f"{arm} `{' '.join(flags) or '(defaults)'}`" for arm, flags in report["arms"].items())
             + f". Shared train.py flags: `{' '.join(report['train_flags']) or '(none)'}`."]
    if report["missing_runs"]:
        lines += ["", f"Not finished (left out): {', '.join(report['missing_runs'])}."]
    lines += ["", f"## Accuracy (%): mean over seeds [{level}% CI]", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, by_measure in report["accuracy"].items():
        cells = [f"{_pct(e['mean'])} [{_pct(e['ci'][0])}, {_pct(e['ci'][1])}]" if (e := by_measure.get(m)) else ""
                 for m in measures]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Per seed (%)", "", "| arm | seed | " + " | ".join(header[1:]) + " |",
              "|" + "---|" * (len(header) + 1)]
    for arm, by_measure in report["accuracy"].items():
        for seed in report["seeds"]:
            cells = []
            for m in measures:
                row = next((r for r in by_measure.get(m, {}).get("per_seed", []) if r["seed"] == seed), None)
                cells.append(_pct(row["accuracy"]) if row else "")
            if any(cells):
                lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    if report["differences"]:
        lines += ["", f"## Paired differences (points): mean over seeds [{level}% CI]", "",
                  "Paired by seed and record (the same records scored for both arms).", "",
                  "| difference | " + " | ".join(header[1:]) + " |", "|" + "---|" * len(header)]
        for name, by_measure in report["differences"].items():
            cells = [f"{_pct(e['mean'])} [{_pct(e['ci'][0])}, {_pct(e['ci'][1])}]" if (e := by_measure.get(m))
                     else "" for m in measures]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Held-out accuracy after the warm-up (%), per seed", "",
              "When the RL arms start from the control's warm-up (the default), these are equal within a seed.", ""]
    for row in report["after_warmup"]:
        lines.append(f"- seed {row['seed']}: " + ", ".join(
            f"{arm} {_pct(v)}" if v is not None else f"{arm} -" for arm, v in row.items() if arm != "seed"))
    lines += ["", "## Figures", "", "![accuracy](accuracy.png)", "", "![curves](curves.png)", "",
              f"Intervals: {report['bootstrap']['method']} ({report['bootstrap']['resamples']} replicates, "
              f"seed {report['bootstrap']['seed']}). The accuracy of a run is its final evaluation (after RL; after "
              "the warm-up for warmup_only), greedy, on the whole validation split (the training reward) and on "
              "BFCL's fixed seeded subset per category (BFCL's decoding and checker)."]
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict, path: Path) -> Path:
    measures = list(report["measures"])
    series = {arm: [100 * by_measure[m]["mean"] if m in by_measure else 0.0 for m in measures]
              for arm, by_measure in report["accuracy"].items()}
    intervals = {arm: [(100 * by_measure[m]["ci"][0], 100 * by_measure[m]["ci"][1]) if m in by_measure else (0, 0)
                       for m in measures] for arm, by_measure in report["accuracy"].items()}
    return bar_chart([report["measures"][m]["label"] for m in measures], series, path,
                     f"accuracy, mean over seeds ({int(report['bootstrap']['level'] * 100)}% CI)", "accuracy (%)",
                     intervals=intervals)


def plot_curves(runs_by_arm: dict[str, list[Path]], path: Path, ema_weight: float) -> Path:
    """The paper's figure: arms overlaid, one panel per metric; each seed a thin line, the mean over seeds bold,
    all EMA-smoothed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for k, (arm, run_dirs) in enumerate(runs_by_arm.items()):
        color = f"C{k}"
        curves = [[r for r in read_metrics(run) if r.get("phase") == "rl"] for run in run_dirs]
        if not any(curves):
            continue  # warmup_only has no RL steps
        for ax, (key, title) in zip(axes.flat, CURVES):
            smoothed = []
            for rows in curves:
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    steps, values = zip(*pts)
                    smoothed.append((steps, ema(list(values), ema_weight)))
                    ax.plot(steps, smoothed[-1][1], color=color, alpha=0.3, linewidth=0.8,
                            marker="o" if len(steps) < 3 else None)  # a line of one point would not show
            n = min((len(s[0]) for s in smoothed), default=0)
            if n:
                ax.plot(smoothed[0][0][:n], np.mean([s[1][:n] for s in smoothed], axis=0), color=color,
                        linewidth=2, label=f"{arm} ({len(smoothed)} seeds)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("RL step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"EMA {ema_weight}; thin: seeds, bold: mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(out: Path, runs: list[Run], arms: list[str], command: str, train_flags: list[str],
                 ema_weight: float) -> dict:
    """report.json, report.md, accuracy.png and curves.png from the finished runs; -> the report."""
    done = [r for r in runs if r.finished]
    if not done:
        raise SystemExit(f"error: no finished run under {out}: nothing to report")
    outcomes = [read_outcome(r) for r in done]
    report = build_report(outcomes, arms, [r.name for r in runs if not r.finished], command, train_flags)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    plot_accuracy(report, out / "accuracy.png")
    plot_curves({arm: [r.path for r in done if r.arm == arm] for arm in arms}, out / "curves.png", ema_weight)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.ablate", allow_abbrev=False,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="FunRL vs GRPO vs warm-up only, paired by seed, with bootstrap "
                                             "intervals. Flags not listed here go to every train.py run.")
    ap.add_argument("--arms", default="funrl,grpo,warmup_only", help=f"comma-separated, from: {', '.join(ARM_FLAGS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    ap.add_argument("--out", required=True, help="the ablation directory (one run directory per arm and seed)")
    ap.add_argument("--jobs", type=int, default=1, help="train.py processes at once (sharing the cores)")
    ap.add_argument("--bfcl-categories", default="simple_python,multiple,parallel,parallel_multiple",
                    help="BFCL categories every run is scored on ('' for none)")
    ap.add_argument("--bfcl-limit", type=int, default=20, help="items per BFCL category (a fixed seeded subset)")
    ap.add_argument("--ema", type=float, default=0.6, help="EMA weight of the curves (0 = none)")
    ap.add_argument("--no-share-warmup", action="store_true",
                    help="run the warm-up in every run instead of starting the RL arms from the control's")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    args, train_flags = ap.parse_known_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_FLAGS]
    if unknown or not arms:
        raise SystemExit(f"error: --arms: unknown arm {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ARM_FLAGS)}")
    if args.seeds < 1 or args.jobs < 1 or args.bfcl_limit < 1 or not 0 <= args.ema < 1:
        raise SystemExit("error: --seeds, --jobs and --bfcl-limit must be >= 1 and --ema in [0, 1)")
    try:
        if args.bfcl_categories:
            args.bfcl_categories = ",".join(parse_categories(args.bfcl_categories))
    except BFCLDataError as e:
        raise SystemExit(f"error: --bfcl-categories: {e}") from None
    reserved = [f for f in train_flags if f.split("=")[0] in RESERVED]
    if reserved:
        raise SystemExit(f"error: {reserved[0].split('=')[0]} is set per run by eval.ablate (use --out and --seeds)")
    out = Path(args.out)
    settings = {"train_flags": train_flags, "bfcl_categories": args.bfcl_categories, "bfcl_limit": args.bfcl_limit}
    settings_file = out / "ablate.json"
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if args.report_only:
            train_flags = before.get("train_flags", train_flags)
        elif before != settings:
            raise SystemExit(f"error: {out} holds runs made with other settings ({before}); use the same flags "
                             "or another --out")
    elif not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=1))
    runs = [Run(arm, seed, out) for arm in arms for seed in range(args.seeds)]
    if not args.report_only:
        scheduler = Scheduler(train_flags, args.bfcl_categories, args.bfcl_limit, args.jobs,
                              share_warmup=not args.no_share_warmup)
        failed = scheduler.run_all(runs)
        if failed:
            last = failed[0].log.read_text().strip().splitlines()[-1:] if failed[0].log.is_file() else []
            raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; "
                             f"see {failed[0].log} ({last[0] if last else 'no output'}); run the same command again "
                             "to resume, or --report-only for a report of the finished runs")
    report = write_report(out, runs, arms, "python -m eval.ablate " + shlex.join(argv), train_flags, args.ema)
    print(f"[ablate] {out / 'report.md'}, {out / 'report.json'}, {out / 'accuracy.png'}, {out / 'curves.png'}")
    for arm, by_measure in report["accuracy"].items():
        print(f"[ablate] {arm}: " + ", ".join(f"{report['measures'][m]['label']} {_pct(e['mean'])} "
                                             f"[{_pct(e['ci'][0])}, {_pct(e['ci'][1])}]"
                                             for m, e in by_measure.items()))


if __name__ == "__main__":
    main()

"""Training curves from one or more runs, overlaid (like the paper's GRPO-vs-FunRL figure).

    python -m eval.plot runs/grpo runs/funrl [--out plots/] [--smooth 5]

Writes curves.png (reward, KL, chain-of-thought entropy, response length, accuracy, entropy bonus) into --out
(default: the first run's plots/ folder) and prints its path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [("reward", "reward (mean)"), ("kl", "KL to reference (k3)"), ("cot_entropy", "<think> token entropy"),
          ("resp_len_mean", "response length (tokens)"), ("accuracy", "exact-call accuracy (rollouts)"),
          ("bonus", "entropy bonus (mean)")]


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is this a run directory of train.py?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{n}: skipped an unreadable line")
    return rows


def smooth(values: list[float], k: int) -> list[float]:
    if k <= 1:
        return values
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, as TensorBoard smooths: s_t = weight * s_(t-1) + (1 - weight) * v_t, with the
    start-up bias removed (so the first point is v_0, not weight * 0). weight 0 returns the values."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def plot_runs(run_dirs, out_dir=None, smooth_k: int = 1) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir) if out_dir else Path(run_dirs[0]) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for run in run_dirs:
        rows = [r for r in read_metrics(run) if r.get("phase") == "rl"]
        label = Path(run).name
        for ax, (key, title) in zip(axes.flat, PANELS):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot([p[0] for p in pts], smooth([p[1] for p in pts], smooth_k), label=label)
            ax.set_title(title)
            ax.set_xlabel("RL step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart(groups: list[str], series: dict[str, list[float]], path, title: str = "", ylabel: str = "",
              intervals: dict[str, list[tuple[float, float]]] | None = None) -> Path:
    """Grouped bars: one group per name in `groups`, one bar per series (e.g. a model) in each group, the value
    written above each bar. series: {label: [value per group]}; intervals {label: [(low, high) per group]} draws
    error bars. Writes the PNG to `path` and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, n / 2) + 2), 4.5))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        yerr = None
        if intervals and label in intervals:
            yerr = [[max(0.0, v - lo) for v, (lo, _) in zip(values, intervals[label])],
                    [max(0.0, hi - v) for v, (_, hi) in zip(values, intervals[label])]]
        bars = ax.bar(xs, values, width, label=label, yerr=yerr, capsize=3 if yerr else 0)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plot training curves of one or more runs, overlaid.")
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", default=None, help="output folder (default: <first run>/plots)")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    args = ap.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.smooth))


if __name__ == "__main__":
    main()

"""Experiment tracking for train.py: the rows of metrics.jsonl, the resolved config and the sample completions,
sent to TensorBoard or Weights & Biases as well (`--report-to tensorboard|wandb`; default none).

    tracker = open_tracker("tensorboard", run_dir, config)   # fails at once, with what to install, if missing
    tracker.log_row({"phase": "rl", "step": 3, "reward": 0.5, ...})   # a metrics.jsonl row
    tracker.log_samples(3, [{"id", "prompt", "completion", "reward", "reason"}, ...])
    tracker.close()

Neither package is a dependency: each is imported only when asked for. Both work offline: TensorBoard writes
event files under <run_dir>/tensorboard; wandb honours WANDB_MODE=offline (files under <run_dir>/wandb, upload
later with `wandb sync`) and WANDB_PROJECT (default "funrl").

Names: a row's numeric values are logged as "<phase>/<key>" at the row's step ("rl/reward", "warmup/sft_nll");
keys that already start with "eval/" keep their name. The summary row is logged at the last step seen.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb")
SAMPLE_COLUMNS = ("step", "id", "prompt", "completion", "reward", "reason")


def metric_name(phase: str, key: str) -> str:
    return key if key.startswith("eval/") else f"{phase}/{key}"


def numeric_items(row: dict):
    """(name, float) for every number of a metrics row (bools count; strings, None and non-finite do not)."""
    phase = str(row.get("phase", "train"))
    for key, value in row.items():
        if key in ("phase", "step") or isinstance(value, str) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield metric_name(phase, key), float(value)


class Tracker:
    """--report-to none: does nothing."""

    def log_row(self, row: dict) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(report_to: str, run_dir, config: dict) -> Tracker:
    if report_to in ("", "none"):
        return Tracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(run_dir), config)
    if report_to == "wandb":
        return WandbTracker(Path(run_dir), config)
    raise SystemExit(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pass --report-to none)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.last_step = 0
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", 0)
        self.writer.flush()

    def log_row(self, row: dict) -> None:
        step = int(row.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        for name, value in numeric_items(row):
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(step, samples), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def samples_markdown(step: int, samples: list[dict]) -> str:
    """A Markdown table (TensorBoard's text tab renders it); cells escaped so a completion cannot break it."""
    def cell(value) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        # every line break Python knows (\r, \x0b, \x1c, \u2028, ...): sampled text can hold any of them
        return "<br>".join(text.replace("\\", "\\\\").replace("|", "\\|").splitlines())

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    for s in samples:
        lines.append("| " + " | ".join(cell(step if c == "step" else s.get(c, "")) for c in SAMPLE_COLUMNS) + " |")
    return "\n".join(lines)


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report-to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline "
                             "works without network; or pass --report-to none)") from None
        import os
        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "funrl"), name=run_dir.name,
                              dir=str(run_dir), config=config)
        for phase in ("warmup", "rl", "eval"):  # each phase has its own step axis (warm-up steps restart at 0)
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        self.last_step = 0

    def log_row(self, row: dict) -> None:
        phase = str(row.get("phase", "train"))
        step = int(row.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        data = dict(numeric_items(row))
        if phase == "summary":
            self.run.summary.update(data)
            return
        data[f"{phase}/step"] = step
        self.run.log(data)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS),
                                 data=[[step if c == "step" else s.get(c) for c in SAMPLE_COLUMNS] for s in samples])
        self.run.log({"samples": table, "rl/step": step})

    def close(self) -> None:
        self.run.finish()

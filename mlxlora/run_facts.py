"""The facts of a training run, read from its folder: records, config and summary.

Training writes metrics.jsonl (one line per training report and per evaluation),
training_config.json (the resolved config) and run_summary.json (parameter counts, data
summary, the learning-rate rule). Everything here reads only those files.
"""

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mlxlora.errors import ConfigError

logger = logging.getLogger("mlxlora")

METRICS_FILE = "metrics.jsonl"
TRAINING_CONFIG_FILE = "training_config.json"
SUMMARY_FILE = "run_summary.json"


@dataclass
class Run:
    """The records and settings of one run folder."""

    folder: Path
    train: list[dict]
    val: list[dict]
    config: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    learning_rate: float | None = None
    total_steps: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.val]
        return max(steps, default=0)

    @property
    def best_val(self) -> dict | None:
        finite = [r for r in self.val if is_finite(r.get("val_loss"))]
        return min(finite, key=lambda r: r["val_loss"], default=None)


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path) -> dict:
    """Return a JSON file's object, or {} when the file is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: cannot be read (%s). The report leaves its facts out.", path, error)
        return {}
    return content if isinstance(content, dict) else {}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Return the training and validation records, one per step, sorted by step.

    A resumed run appends to metrics.jsonl and may report a step again; the later record
    wins. A line cut short by a killed process is skipped.
    """
    train, val = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not valid JSON, skipped", path, number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if "train_loss" in record:
            train[record["step"]] = record
        if "val_loss" in record:
            val[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def load_run(folder) -> Run:
    """Read a run folder; raise ConfigError when it contains no metrics.jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: folder not found. Pass the --adapter-path folder of a "
                          "training run.")
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise ConfigError(f"{folder}: {METRICS_FILE} not found, so this is not a training run "
                          "folder, or the run stopped before its first report.")

    train, val = read_metrics(metrics)
    saved = read_json(folder / TRAINING_CONFIG_FILE)
    return Run(folder, train, val, config=saved.get("config", {}),
               sources=saved.get("sources", {}), learning_rate=saved.get("learning_rate_used"),
               total_steps=saved.get("total_steps"), summary=read_json(folder / SUMMARY_FILE))


def median_tokens_per_second(run: Run) -> float | None:
    """Return the median tokens/s of the reports after the first, which includes compilation."""
    rates = [r["tokens_per_second"] for r in run.train if is_finite(r.get("tokens_per_second"))]
    if len(rates) > 1:
        rates = rates[1:]
    return statistics.median(rates) if rates else None


def effective_batch(run: Run) -> int | None:
    """Return examples per optimizer step, from the summary or, for older runs, the config."""
    if run.summary.get("effective_batch"):
        return run.summary["effective_batch"]
    batch, accumulation = run.config.get("batch_size"), run.config.get("grad_accumulation_steps")
    return batch * accumulation if batch and accumulation else None


def peak_memory(run: Run) -> float | None:
    values = [r["peak_memory_gb"] for r in run.train if is_finite(r.get("peak_memory_gb"))]
    return max(values) if values else None


def scaling(config: dict) -> float | None:
    if not config.get("r") or not config.get("lora_alpha"):
        return None
    r = config["r"] ** 0.5 if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / r


def learning_rate_curve(run: Run, points: int = 400) -> tuple[list[int], list[float]]:
    """Return (step, learning rate) along the run's schedule, rebuilt from its config."""
    from mlxlora.schedule import build_schedule, default_warmup

    config, total = run.config, run.total_steps
    if run.learning_rate is None or not total or "lr_schedule" not in config:
        return [], []
    warmup = config.get("warmup_steps")
    warmup = default_warmup(total) if warmup is None else warmup
    schedule = build_schedule(run.learning_rate, total, config["lr_schedule"], warmup,
                              config.get("min_lr_ratio", 0.1))

    stride = max(1, total // points)
    indices = sorted(set(range(0, total, stride)) | {total - 1})
    # Optimizer step i (0-based) uses schedule(i) and ends at step i + 1.
    return [i + 1 for i in indices], [float(schedule(i)) for i in indices]

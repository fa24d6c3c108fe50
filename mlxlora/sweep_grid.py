"""The grid of a learning-rate sweep: --lrs, --batch-sizes, --ranks and the examples budget.

Every grid point trains on the same number of examples, so a batch size of 16 takes an
eighth of the optimizer steps of a batch size of 2. The budget is rounded up to a multiple
of every effective batch size, so each point sees exactly the same examples.
"""

import math
from dataclasses import dataclass

import numpy as np

from mlxlora.errors import ConfigError

# Optimizer steps per point at the smallest batch size when neither --steps nor --examples
# is given.
DEFAULT_STEPS = 50
# The default learning-rate grid: this many values, log-spaced from centre / SPAN to
# centre * SPAN, so it reaches down to a typical full fine-tuning rate (centre / 10).
DEFAULT_LR_COUNT = 5
DEFAULT_LR_SPAN = 10.0
# Rounding the budget up to a common multiple of the batch sizes may grow it at most this
# much. Beyond that, the batch sizes are rejected with a suggestion.
MAX_BUDGET_GROWTH = 2.0

# TrainConfig fields of `mlxlora train` that a sweep does not use: output, run length,
# evaluation schedule, checkpoints and reporting.
TRAIN_ONLY_FIELDS = ("adapter_path", "iters", "epochs", "steps_per_report", "steps_per_eval",
                     "save_every", "keep_checkpoints", "early_stopping_patience", "resume",
                     "overwrite", "report_to", "nan_policy")
# TrainConfig fields that the grid sets per point.
GRID_FIELDS = ("learning_rate", "full_ft_lr", "batch_size", "r")


@dataclass(frozen=True)
class GridPoint:
    """One short training run of the sweep."""

    learning_rate: float
    batch_size: int
    rank: int

    @property
    def key(self) -> str:
        """Return the identifier stored in sweep.json, stable across float formatting."""
        return f"lr={self.learning_rate:.6g},batch_size={self.batch_size},rank={self.rank}"


def _parse_float(text: str, option: str, problems: list[str]) -> float | None:
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{option}: {text!r} is not a number")
        return None
    if not math.isfinite(value) or value <= 0:
        problems.append(f"{option}: {text!r} must be a positive number")
        return None
    return value


def parse_learning_rates(text: str, option: str = "--lrs") -> list[float]:
    """Parse START:STOP:COUNT (COUNT values log-spaced, both ends included) or a comma list.

    Returns the distinct values in increasing order; raises ConfigError naming the option.
    """
    problems = []
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ConfigError(f"{option} {text!r}: a range is START:STOP:COUNT, e.g. 1e-5:1e-2:7")
        start = _parse_float(parts[0], option, problems)
        stop = _parse_float(parts[1], option, problems)
        count = _parse_count(parts[2], option, problems)
        if start is not None and stop is not None and stop <= start:
            problems.append(f"{option} {text!r}: STOP must be larger than START")
        if problems:
            raise ConfigError(problems)
        values = np.geomspace(start, stop, count).tolist()
    else:
        values = [_parse_float(part.strip(), option, problems) for part in text.split(",")]
        if problems:
            raise ConfigError(problems)

    return sorted({float(f"{value:.6g}") for value in values})


def _parse_count(text: str, option: str, problems: list[str]) -> int:
    try:
        count = int(text)
    except ValueError:
        problems.append(f"{option}: COUNT {text!r} is not a whole number")
        return 2
    if count < 2:
        problems.append(f"{option}: COUNT must be at least 2, got {count}")
    return count


def parse_integers(text: str, option: str) -> list[int]:
    """Parse a comma list of positive whole numbers into distinct increasing values."""
    values, problems = set(), []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            problems.append(f"{option}: {part!r} is not a whole number")
            continue
        if value < 1:
            problems.append(f"{option}: {value} must be at least 1")
            continue
        values.add(value)
    if problems:
        raise ConfigError(problems)
    return sorted(values)


def default_learning_rates(centre: float) -> list[float]:
    """Return DEFAULT_LR_COUNT log-spaced rates from centre / DEFAULT_LR_SPAN to centre * it."""
    values = np.geomspace(centre / DEFAULT_LR_SPAN, centre * DEFAULT_LR_SPAN, DEFAULT_LR_COUNT)
    return [float(f"{value:.6g}") for value in values]


def examples_budget(effective_batch_sizes: list[int], steps: int | None = None,
                    examples: int | None = None) -> int:
    """Return the number of training examples every grid point sees.

    ``steps`` counts optimizer steps at the smallest effective batch size (default
    DEFAULT_STEPS); ``examples`` sets the budget directly. The result is rounded up to a
    multiple of every effective batch size. Raises ConfigError when both are given, when a
    value is below 1, or when the rounding would more than double the budget.
    """
    if steps is not None and examples is not None:
        raise ConfigError("--steps and --examples both set the length of each grid point; "
                          "pass only one")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if examples is not None and examples < 1:
        raise ConfigError(f"--examples must be at least 1, got {examples}")

    if examples is None:
        examples = (steps or DEFAULT_STEPS) * min(effective_batch_sizes)

    multiple = math.lcm(*effective_batch_sizes)
    budget = math.ceil(examples / multiple) * multiple
    if budget > MAX_BUDGET_GROWTH * examples:
        sizes = ", ".join(str(size) for size in effective_batch_sizes)
        raise ConfigError(
            f"effective batch sizes {sizes} (batch size x grad_accumulation_steps) need a "
            f"budget that is a multiple of {multiple} examples, so that every point sees the "
            f"same examples, but {examples} were requested. Use batch sizes that divide each "
            f"other (such as 2, 8, 32) or pass --examples {multiple} or more.")
    return budget


def build_grid(learning_rates: list[float], batch_sizes: list[int],
               ranks: list[int]) -> list[GridPoint]:
    """Return every combination, ordered by rank so the adapter is rebuilt once per rank."""
    return [GridPoint(lr, batch_size, rank)
            for rank in ranks for batch_size in batch_sizes for lr in learning_rates]

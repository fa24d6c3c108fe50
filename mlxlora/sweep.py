"""`mlxlora sweep`: short LoRA runs over learning rate, batch size and rank, in one process.

The base model is loaded once. Each grid point restores the same initial adapter, trains
with a fresh optimizer on the same examples in the same order, and is scored by validation
loss after the same number of examples. Each finished point is written to sweep.json at
once, so an interrupted sweep resumes from the points already done.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxlora.batching import pad_token_id
from mlxlora.config import FIELDS, ResolvedConfig
from mlxlora.errors import ConfigError, DataError
from mlxlora.files import atomic_write_json
from mlxlora.hyperparams import choose_learning_rate
from mlxlora.loading import load_model
from mlxlora.session import configure_device, load_splits
from mlxlora.sweep_grid import (GRID_FIELDS, TRAIN_ONLY_FIELDS, build_grid,
                                default_learning_rates, examples_budget)
from mlxlora.sweep_plot import plot_sweep
from mlxlora.sweep_report import Recommendation, describe, format_table, recommend
from mlxlora.sweep_runner import EvalSet, SweepRunner

logger = logging.getLogger("mlxlora")

RESULT_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
FORMAT_VERSION = 1

# A sweep resumes only when every other TrainConfig field matches the stored one. Skipping
# the data check changes no result.
IGNORED_FIELDS = GRID_FIELDS + TRAIN_ONLY_FIELDS + ("skip_data_check",)

# Without valid.jsonl, this fraction of the training examples (at least 1, at most
# MAX_HELD_OUT) is held out for scoring and not trained on.
HELD_OUT_FRACTION = 0.1
MAX_HELD_OUT = 200

# Active memory after a point may exceed the first point's by this factor plus this many
# MB (allocator noise) before the sweep warns that memory is growing.
MEMORY_GROWTH = 1.1
MEMORY_SLACK_MB = 50.0


@dataclass
class SweepOptions:
    """The sweep's own options; None means the default described in `mlxlora sweep --help`."""

    output: Path
    learning_rates: list[float] | None = None
    batch_sizes: list[int] | None = None
    ranks: list[int] | None = None
    steps: int | None = None
    examples: int | None = None
    evals: int = 1
    overwrite: bool = False
    recipe: str | None = None
    flags: dict = field(default_factory=dict)


@dataclass
class SweepData:
    """Encoded training examples and the split that scores each point."""

    train: list
    valid: list
    valid_source: str


def hold_out(examples: list, seed: int) -> tuple[list, list]:
    """Split a seeded slice off the training examples; return (train, held out)."""
    if len(examples) < 2:
        raise DataError("The training split has fewer than 2 usable examples and there is no "
                        "valid.jsonl, so no examples are left to score a sweep. Add "
                        "valid.jsonl or more training examples.")
    count = min(MAX_HELD_OUT, max(1, int(len(examples) * HELD_OUT_FRACTION)))
    order = np.random.default_rng([seed, 1]).permutation(len(examples)).tolist()
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    valid = [e for i, e in enumerate(examples) if i in held]
    return train, valid


def sweep_data(config, tokenizer) -> SweepData:
    train_split, valid_split = load_splits(config, tokenizer)
    if valid_split is not None:
        return SweepData(train_split.examples, valid_split.examples,
                         f"valid.jsonl ({len(valid_split.examples)} examples)")

    train, valid = hold_out(train_split.examples, config.seed)
    logger.info("no valid.jsonl: scoring on %d held-out training examples, training on the "
                "other %d", len(valid), len(train))
    return SweepData(train, valid, f"held-out slice of train ({len(valid)} examples)")


def data_hash(data: SweepData) -> str:
    """Return a short hash of the encoded tokens and masks of both splits."""
    digest = hashlib.sha256()
    for examples in (data.train, data.valid):
        for example in examples:
            digest.update(np.asarray(example.tokens, dtype=np.int64).tobytes())
            digest.update(np.asarray(example.mask, dtype=np.int8).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def sweep_settings(config, budget: int, data: SweepData) -> dict:
    """Return everything that fixes a point's result besides the point itself."""
    kept = {name: getattr(config, name) for name in FIELDS if name not in IGNORED_FIELDS}
    settings = {"config": kept, "examples_per_point": budget, "data_hash": data_hash(data)}
    return json.loads(json.dumps(settings))


def settings_differences(stored: dict, current: dict) -> list[str]:
    differences = []
    for key in sorted(set(stored) | set(current)):
        if key == "config":
            continue
        if stored.get(key) != current.get(key):
            differences.append(f"{key}: {stored.get(key)!r} then, {current.get(key)!r} now")
    old, new = stored.get("config", {}), current.get("config", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            differences.append(f"{name}: {old.get(name)!r} then, {new.get(name)!r} now")
    return differences


def prepare_output(options: SweepOptions) -> Path:
    folder = Path(options.output)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; pass a folder")
    if options.overwrite:
        for name in (RESULT_FILE, PLOT_FILE):
            (folder / name).unlink(missing_ok=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output {folder}: cannot create it ({error.strerror})") from None
    return folder


def load_result(folder: Path, settings: dict) -> dict:
    """Return the stored result when it was made with the same settings, else a new one."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "settings": settings, "points": []}

    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: invalid JSON ({error.msg}). Pass "
                          "--overwrite to start the sweep again.") from None

    differences = settings_differences(stored.get("settings", {}), settings)
    if differences:
        raise ConfigError(differences, header=(
            f"{path} contains a sweep made with other settings, so its points cannot be "
            "reused. Pass --overwrite to replace it, or another --output. Differences:"))
    logger.info("resuming the sweep in %s: %d points already done", folder,
                len(stored.get("points", [])))
    return stored


def choose_grid(options: SweepOptions, config, loaded) -> list:
    """Return the grid points: given values, or defaults around the LoRA learning rate."""
    learning_rates = options.learning_rates
    if learning_rates is None:
        model_config = loaded.config
        choice = choose_learning_rate(config.learning_rate, config.full_ft_lr,
                                      model_config.get("model_type", ""),
                                      model_config.get("hidden_size", 0))
        learning_rates = default_learning_rates(choice.value)
        logger.info("learning rates centred on %.3g (%s): %s", choice.value, choice.reason,
                    ", ".join(f"{lr:.3g}" for lr in learning_rates))
    batch_sizes = options.batch_sizes or [config.batch_size]
    ranks = options.ranks or [config.r]
    return build_grid(learning_rates, batch_sizes, ranks)


def run_sweep(resolved: ResolvedConfig, options: SweepOptions) -> dict:
    """Run every grid point not yet in sweep.json; write the JSON, the plot and the advice.

    Returns the result dict stored in sweep.json.
    """
    config = resolved.config
    folder = prepare_output(options)
    configure_device()

    loaded = load_model(config.model, dtype=config.dtype, dequantize=config.dequantize,
                        trust_remote_code=config.trust_remote_code)
    data = sweep_data(config, loaded.tokenizer)
    grid = choose_grid(options, config, loaded)
    sizes = sorted({p.batch_size * config.grad_accumulation_steps for p in grid})
    budget = examples_budget(sizes, options.steps, options.examples)

    result = load_result(folder, sweep_settings(config, budget, data))
    eval_set = EvalSet(data.valid, config.batch_size, config.val_batches,
                       pad_token_id(loaded.tokenizer))
    runner = SweepRunner(config, loaded, data.train, eval_set, budget, options.evals)
    start_loss = runner.start_loss(grid[0].rank)
    result.update({"model": config.model, "valid_source": data.valid_source,
                   "valid_examples_scored": eval_set.num_examples, "start_val_loss": start_loss})
    logger.info("start validation loss %.4f on %s; %d grid points of %d training examples",
                start_loss, data.valid_source, len(grid), budget)

    run_points(runner, grid, result, folder, start_loss)
    return finish(result, folder, options)


def run_points(runner: SweepRunner, grid: list, result: dict, folder: Path,
               start_loss: float) -> None:
    done = {point["key"] for point in result["points"]}
    todo = [point for point in grid if point.key not in done]
    if len(todo) < len(grid):
        logger.info("%d of %d grid points reused from %s", len(grid) - len(todo), len(grid),
                    folder / RESULT_FILE)

    first_memory = None
    for number, point in enumerate(todo, start=1):
        logger.info("point %d/%d: learning rate %.3g, batch size %d, rank %d", number, len(todo),
                    point.learning_rate, point.batch_size, point.rank)
        outcome = runner.run(point, start_loss)
        if outcome.reason:
            logger.warning("point %d/%d diverged: %s", number, len(todo), outcome.reason)
        else:
            logger.info("point %d/%d: validation loss %.4f after %d steps (%.1f s, active "
                        "memory %.1f MB)", number, len(todo), outcome.val_loss, outcome.steps,
                        outcome.seconds, outcome.active_memory_mb)

        if first_memory is None:
            first_memory = outcome.active_memory_mb
        if outcome.active_memory_mb > MEMORY_GROWTH * first_memory + MEMORY_SLACK_MB:
            logger.warning("active memory grew from %.1f MB after the first point to %.1f MB; "
                           "grid points are meant to free everything they allocate",
                           first_memory, outcome.active_memory_mb)

        result["points"].append(outcome.to_dict())
        atomic_write_json(folder / RESULT_FILE, result)


def finish(result: dict, folder: Path, options: SweepOptions) -> dict:
    """Add the recommendation, write sweep.json and sweep.png, and return the result."""
    recommendation = recommend(result["points"], result["start_val_loss"], options.recipe,
                               options.flags)
    result["recommendation"] = recommendation.to_dict() if recommendation else None
    atomic_write_json(folder / RESULT_FILE, result)
    plot_sweep(result, folder / PLOT_FILE)
    return result


def report_lines(result: dict) -> list[str]:
    """Return the table and the recommendation for the terminal."""
    recommendation = Recommendation.from_dict(result.get("recommendation"))
    best_key = recommendation.key if recommendation else None
    table = format_table(result["points"], result["start_val_loss"], best_key)
    return [table, ""] + describe(recommendation)

"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint folder ``checkpoints/step-0000100`` contains the adapter (adapters.safetensors and
adapter_config.json), the optimizer state (optimizer.safetensors: Adam moments and the
optimizer's step count, which drives the learning-rate schedule) and state.json: the step,
the MLX random key, the data position, the best validation loss and the resolved config.

A checkpoint is filled under a hidden ``.step-N.partial`` name, checked, and renamed into
place, so a kill at any moment leaves every ``step-*`` folder complete.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxlora.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterSpec, load_adapter_weights, save_adapter
from mlxlora.checkpoint_files import (fsync_folder, json_problem, remove_folder_atomically,
                                      safetensors_problem)
from mlxlora.errors import AdapterError, MlxloraError
from mlxlora.files import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger("mlxlora")

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT_VERSION = 2
LEFTOVER_SUFFIXES = (".partial", ".deleting", ".replaced")


class CheckpointError(AdapterError):
    """A checkpoint that is missing, incomplete or cannot be restored."""


class SaveError(MlxloraError):
    """A checkpoint or adapter could not be written (disk full, folder not writable)."""


@dataclass
class TrainingState:
    """The loop's counters; with the weights, optimizer state and random key, a full resume point.

    ``data_position`` and ``data_fingerprint`` are stored for checks on resume: the data
    order is a pure function of (seed, epoch), so ``step`` alone fixes the position.
    """

    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    trained_tokens: int = 0
    config: dict = field(default_factory=dict)
    data_position: dict = field(default_factory=dict)
    data_fingerprint: str | None = None
    learning_rate: float | None = None
    total_steps: int | None = None
    random_state: list = field(default_factory=list)
    format_version: int = STATE_FORMAT_VERSION


STATE_FIELDS = {f.name for f in fields(TrainingState)}


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(folder: Path) -> int | None:
    """Return the step number in a ``step-NNNNNNN`` folder name, or None for other names."""
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def random_state_words() -> list[list[int]]:
    """Return MLX's global random key(s) as plain integers for state.json."""
    return [key.tolist() for key in mx.random.state]


def restore_random_state(words: list[list[int]]) -> None:
    """Set MLX's global random key to a saved value, so dropout continues its sequence.

    mx.random.state cannot be assigned to. But mx.random.seed(s) sets the key to the two 32-bit
    halves of the 64-bit seed s (checked below, mlx 0.32), so it can restore any saved key.
    """
    if len(words) != 1 or len(words[0]) != 2:
        raise CheckpointError(f"random_state {words!r} in {STATE_FILE} is not one 2-word key")
    high, low = (int(w) for w in words[0])
    mx.random.seed((high << 32) | low)
    if random_state_words() != [[high, low]]:
        raise CheckpointError(
            f"this MLX version ({mx.__version__}) does not restore the random key through "
            "mx.random.seed, so dropout cannot continue exactly")


def replace_optimizer_state(optimizer: optim.Optimizer, tree: dict) -> None:
    """Replace the optimizer state with ``tree`` in place.

    The compiled training step captured the optimizer's state dict object when it was built;
    assigning ``optimizer.state = ...`` would leave the compiled step reading the old dict.
    """
    state = optimizer.state
    state.clear()
    state.update(tree)


def restore_optimizer_state(optimizer: optim.Optimizer, flat: dict[str, mx.array]) -> None:
    """Replace the optimizer state with flat ``path: array`` entries read from a file."""
    replace_optimizer_state(optimizer, tree_unflatten(list(flat.items())))


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: optim.Optimizer,
                    spec: AdapterSpec, state: TrainingState, keep: int) -> Path:
    """Write a checkpoint for state.step and delete the oldest beyond ``keep``.

    Raises SaveError when the disk is full or the folder is not writable; the checkpoints
    written before stay intact.
    """
    root = run_dir / CHECKPOINTS_DIR
    final = root / checkpoint_name(state.step)
    partial = root / f".{final.name}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        write_checkpoint_files(partial, model, optimizer, spec, state)
        move_into_place(partial, final)
    except (OSError, RuntimeError) as error:
        # mx.save_safetensors reports a failed write (ENOSPC, EACCES) as RuntimeError.
        shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error)
        raise SaveError(f"cannot write checkpoint {final}: {reason}") from None

    prune_checkpoints(root, keep, protect=state.best_step)
    return final


def write_checkpoint_files(folder: Path, model: nn.Module, optimizer: optim.Optimizer,
                           spec: AdapterSpec, state: TrainingState) -> None:
    save_adapter(folder, model, spec)
    atomic_save_safetensors(folder / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
    state.random_state = random_state_words()
    # state.json goes last: list_checkpoints counts a folder only once it exists.
    atomic_write_json(folder / STATE_FILE, asdict(state))

    problems = checkpoint_problems(folder)
    if problems:
        raise OSError(0, "written files are incomplete: " + "; ".join(problems))
    fsync_folder(folder)


def move_into_place(partial: Path, final: Path) -> None:
    if final.exists():
        # Only a re-save of the same step gets here; the new folder replaces the old one.
        remove_folder_atomically(final, "replaced")
    partial.rename(final)
    fsync_folder(final.parent)


def list_checkpoints(root: Path) -> list[Path]:
    """Return the checkpoint folders under ``root`` with a state.json, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(root: Path, keep: int, protect: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints and the one of step ``protect`` (the best)."""
    checkpoints = list_checkpoints(root)
    newest = checkpoints[-keep:] if keep > 0 else []
    for old in checkpoints:
        if old in newest or checkpoint_step(old) == protect:
            continue
        try:
            remove_folder_atomically(old, "deleting")
        except OSError as error:
            logger.warning("could not delete old checkpoint %s: %s", old, error.strerror)


def remove_leftovers(root: Path) -> list[str]:
    """Delete hidden folders a killed run left behind (partial saves, unfinished deletes)."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith(LEFTOVER_SUFFIXES):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def checkpoint_problems(folder: Path) -> list[str]:
    """Return what makes a checkpoint folder incomplete or unreadable; empty when loadable."""
    problems = [safetensors_problem(folder / WEIGHTS_FILE),
                safetensors_problem(folder / OPTIMIZER_FILE),
                json_problem(folder / CONFIG_FILE),
                json_problem(folder / STATE_FILE)]
    return [p for p in problems if p]


def find_checkpoint(path: Path) -> Path:
    """Return the checkpoint to resume from: ``path`` itself, or a run folder's newest whole one.

    A newest checkpoint that fails the completeness check is skipped with a warning, and the
    one before it is used. Kills cannot cause this, because saves are atomic, but a damaged
    disk can.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: not found. Pass a run folder (the "
                              "--adapter-path of a run) or one of its checkpoints/step-* folders.")
    if (path / STATE_FILE).is_file():
        problems = checkpoint_problems(path)
        if problems:
            raise CheckpointError([f"--resume {path}: {p}" for p in problems],
                                  header=f"--resume {path}: the checkpoint is incomplete:")
        return path

    checkpoints = list_checkpoints(path / CHECKPOINTS_DIR)
    if not checkpoints:
        raise CheckpointError(f"--resume {path}: no checkpoint found (looked for "
                              f"{path / CHECKPOINTS_DIR}/step-*/{STATE_FILE}). Was the run "
                              "stopped before its first checkpoint? Start it again with --overwrite.")
    for candidate in reversed(checkpoints):
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate
        logger.warning("skipping incomplete checkpoint %s: %s", candidate, "; ".join(problems))
    raise CheckpointError(f"--resume {path}: all {len(checkpoints)} checkpoints are incomplete")


def run_folder_of(checkpoint: Path) -> Path | None:
    """Return the run folder that contains a checkpoint, or None for a standalone copy."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        return checkpoint.parent.parent
    return None


def read_state(folder: Path) -> TrainingState:
    """Read a checkpoint's state.json; raise CheckpointError naming missing or unknown fields."""
    path = Path(folder) / STATE_FILE
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read it ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object")

    unknown = sorted(set(content) - STATE_FIELDS)
    if unknown:
        logger.warning("%s: ignoring unknown fields %s (written by a newer mlxlora?)", path,
                       ", ".join(unknown))
    missing = [name for name in ("step", "config", "random_state") if name not in content]
    if missing:
        raise CheckpointError(f"{path}: missing fields {', '.join(missing)}")
    return TrainingState(**{k: v for k, v in content.items() if k in STATE_FIELDS})


def load_checkpoint(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainingState:
    """Restore adapter weights, optimizer state and random key; return the training state."""
    folder = Path(folder)
    state = read_state(folder)
    load_adapter_weights(model, folder / WEIGHTS_FILE)
    restore_optimizer_state(optimizer, mx.load(str(folder / OPTIMIZER_FILE)))
    restore_random_state(state.random_state)
    mx.eval(model.parameters(), optimizer.state)
    return state

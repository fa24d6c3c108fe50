"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint folder ``checkpoints/step-0000100`` holds the adapter (adapters.safetensors and
adapter_config.json), the optimizer state (optimizer.safetensors) and state.json: the step,
the random state, the best validation loss and the resolved config. The data order is a
pure function of (seed, epoch), so the step alone fixes the position in the data.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxlora.adapters import AdapterSpec, load_adapter_weights, save_adapter
from mlxlora.errors import AdapterError
from mlxlora.files import atomic_save_safetensors, atomic_write_json

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class TrainingState:
    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    trained_tokens: int = 0
    config: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: optim.Optimizer,
                    spec: AdapterSpec, state: TrainingState, keep: int) -> Path:
    """Write a checkpoint for state.step and delete the oldest beyond ``keep``.

    The folder is filled under a temporary name and renamed when complete, so a crash never
    leaves a half-written checkpoint under a real step name.
    """
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)

    save_adapter(partial, model, spec)
    atomic_save_safetensors(partial / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
    random_state = [a.tolist() for a in mx.random.state]
    atomic_write_json(partial / STATE_FILE, {**state.__dict__, "random_state": random_state})

    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    prune_checkpoints(root, keep, protect=state.best_step)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())


def prune_checkpoints(root: Path, keep: int, protect: int | None) -> None:
    protected = checkpoint_name(protect) if protect is not None else None
    removable = [p for p in list_checkpoints(root) if p.name != protected]
    for old in removable[:-keep] if keep > 0 else removable:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_checkpoint(path: Path) -> Path:
    """Return the checkpoint folder for --resume PATH: a checkpoint, or a run folder's latest."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path / CHECKPOINTS_DIR)
    if not checkpoints:
        raise AdapterError(f"--resume {path}: no checkpoint found (looked for "
                           f"{path / CHECKPOINTS_DIR}/step-*/{STATE_FILE})")
    return checkpoints[-1]


def load_checkpoint(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainingState:
    """Restore adapter weights, optimizer state and random state; return the training state."""
    load_adapter_weights(model, folder / "adapters.safetensors")

    optimizer_state = mx.load(str(folder / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(optimizer_state.items()))

    content = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    random_state = content.pop("random_state")
    mx.random.state[:] = [mx.array(v, dtype=mx.uint32) for v in random_state]
    mx.eval(model.parameters(), optimizer.state)
    return TrainingState(**content)

"""Resuming a run: merge the checkpoint's config with new options and check that they fit.

Options left out on the command line take the checkpoint's values. Options given again are
compared with the checkpoint: those that shape the adapter, the data order or the random
numbers must match, the rest may change and the change is logged.
"""

import hashlib
import json
import logging
import time
from pathlib import Path

from mlxlora.adapters import check_base, read_adapter_spec
from mlxlora.checkpoint import CHECKPOINTS_DIR, CheckpointError, TrainingState, checkpoint_step, list_checkpoints
from mlxlora.config import FIELDS, ResolvedConfig, TrainConfig, flag_name, validate_ranges
from mlxlora.errors import ConfigError
from mlxlora.files import atomic_write_text

logger = logging.getLogger("mlxlora")

# A different value would give other adapter shapes, another data order or other dropout
# masks, so the checkpoint could not continue the same run.
MUST_MATCH = ("r", "lora_alpha", "target_modules", "layers", "use_rslora", "seed",
              "batch_size", "grad_accumulation_steps", "max_seq_length")
# These change only what is logged, evaluated, saved or checked.
HARMLESS = ("steps_per_report", "steps_per_eval", "val_batches", "save_every",
            "keep_checkpoints", "early_stopping_patience", "report_to", "skip_data_check",
            "grad_checkpoint", "trust_remote_code", "nan_policy", "adapter_path")
# Extending a run: the schedule is rebuilt for the new length.
LENGTH = ("iters", "epochs")
# The base model and the data are compared by content once loaded, not by path.
BY_CONTENT = ("model", "data", "train_on_prompt", "long_examples", "prompt_key", "completion_key")
NOT_COMPARED = ("resume", "overwrite")


def merge_config(resolved: ResolvedConfig, saved: dict, checkpoint: Path,
                 run_folder: Path | None) -> ResolvedConfig:
    """Return the config of the resumed run; raise ConfigError naming every forbidden change."""
    values, sources = {}, dict(resolved.sources)
    problems = []
    for name in FIELDS:
        given = getattr(resolved.config, name)
        if resolved.sources[name] == "default" and name not in NOT_COMPARED:
            values[name], sources[name] = default_for_resume(name, given, saved, run_folder)
            continue

        values[name] = given
        if name in NOT_COMPARED or name not in saved or saved[name] == given:
            continue
        problem = describe_change(name, saved[name], given)
        if problem:
            problems.append(problem)

    if problems:
        raise ConfigError(problems, header=(
            f"--resume {checkpoint}: these options differ from the checkpoint, and a resumed run "
            "must keep them. Leave them out to use the checkpoint's values, or start a new run "
            "with another --adapter-path:"))

    config = TrainConfig(**values)
    range_problems = validate_ranges(config)
    if range_problems:
        raise ConfigError(range_problems)
    return ResolvedConfig(config, sources)


def default_for_resume(name: str, given, saved: dict, run_folder: Path | None):
    """Return (value, source) for an option the user left out when resuming."""
    if name == "adapter_path" and run_folder is not None:
        return str(run_folder), "resumed run folder"
    if name in saved:
        return saved[name], "checkpoint"
    return given, "default"


def describe_change(name: str, before, after) -> str | None:
    """Log an allowed change and return None, or return the problem for a forbidden one."""
    flag = flag_name(name)
    if name in MUST_MATCH:
        return f"{flag} {after!r}: the checkpoint has {before!r}"
    if name in HARMLESS:
        logger.info("resume: %s changed from %r to %r", flag, before, after)
    elif name in LENGTH:
        logger.info("resume: %s changed from %r to %r; the learning-rate schedule is rebuilt "
                    "for the new length", flag, before, after)
    elif name in BY_CONTENT:
        logger.info("resume: %s changed from %r to %r; checked against the checkpoint by "
                    "content once loaded", flag, before, after)
    else:
        logger.warning("resume: %s changed from %r to %r; training continues with the new "
                       "value, so it will not match an uninterrupted run", flag, before, after)
    return None


def data_fingerprint(split) -> str:
    """Return a hash of the encoded training examples: tokens, masks and order."""
    digest = hashlib.sha256()
    for example in split.examples:
        digest.update(json.dumps([example.tokens, [int(m) for m in example.mask]]).encode())
    return digest.hexdigest()[:16]


def check_resume_fits(session, checkpoint: Path, state: TrainingState, position: dict) -> None:
    """Raise when the loaded model or data differ from those the checkpoint was trained on.

    ``position`` is the data position this session computes for the checkpoint's step.
    """
    spec = read_adapter_spec(checkpoint)
    check_base(spec, session.loaded.model, checkpoint)

    problems = []
    if spec.target_modules != session.spec.target_modules:
        problems.append(f"the adapted modules differ: {len(session.spec.target_modules)} now, "
                        f"{len(spec.target_modules)} in the checkpoint (first: "
                        f"{(spec.target_modules or ['none'])[0]})")
    if state.data_fingerprint and state.data_fingerprint != data_fingerprint(session.train_split):
        saved_count = state.data_position.get("examples", "?")
        problems.append(f"the training data differs from the checkpoint's ({len(session.train_split.examples)} "
                        f"examples now, {saved_count} then, or the same count with other tokens). "
                        f"Pass the original --data, or start a new run")
    saved_order = state.data_position.get("epoch_order")
    if not problems and saved_order and saved_order != position.get("epoch_order"):
        problems.append("the batch order of this epoch differs from the checkpoint's (another "
                        "mlxlora version?), so the resumed run would see other batches")
    if problems:
        raise CheckpointError(problems, header=f"--resume {checkpoint}: cannot continue this run:")


def set_aside_newer(run_folder: Path, step: int) -> Path | None:
    """Move checkpoints newer than ``step`` out of the way instead of overwriting them later.

    Resuming from an older checkpoint starts a new branch of the run; its checkpoints would
    reuse the step names of the abandoned branch.
    """
    root = run_folder / CHECKPOINTS_DIR
    newer = [p for p in list_checkpoints(root) if checkpoint_step(p) > step]
    if not newer:
        return None
    target = root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    target.mkdir()
    for folder in newer:
        folder.rename(target / folder.name)
    logger.warning("resuming from step %d: moved the %d newer checkpoints to %s", step,
                   len(newer), target)
    return target


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric records after ``step``, which the resumed run writes again.

    A line cut short by a kill is dropped too.
    """
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        logger.info("%s: dropped %d records after step %d, which this run writes again",
                    path.name, dropped, step)

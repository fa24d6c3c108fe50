"""The training loop around the compiled step: data order, reports, evaluation, saving."""

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from mlxlora.adapters import adapter_weights, save_adapter
from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.checkpoint import (CheckpointError, SaveError, TrainingState, find_checkpoint,
                                load_checkpoint, read_state, replace_optimizer_state,
                                run_folder_of, save_checkpoint)
from mlxlora.config import ResolvedConfig
from mlxlora.errors import MlxloraError
from mlxlora.files import atomic_write_json
from mlxlora.memory_plan import compare_peak
from mlxlora.metric_sinks import check_report_to, open_metric_sinks
from mlxlora.report_log import MetricsWriter, ProgressBar, Throughput
from mlxlora.run_report import write_report_after_training, write_run_summary
from mlxlora.non_finite import describe_non_finite
from mlxlora.resume import (check_resume_fits, data_fingerprint, merge_config, set_aside_newer,
                            trim_metrics)
from mlxlora.run_dir import check_free_space, prepare_run_dir, same_folder
from mlxlora.signals import StopRequest
from mlxlora.session import Session, distributed_group, epoch_batches, prepare_session

logger = logging.getLogger("mlxlora")

BEST_DIR = "best"
TRAINING_CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.jsonl"


class TrainingError(MlxloraError):
    """Training stopped on a NaN/inf loss or another failure the user must act on."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM; ``checkpoint`` is where it can continue from."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class DataOrder:
    """The deterministic stream of micro-batches: epoch e's batches, then e + 1's, and so on.

    Micro-batch i of the run is batch i % n of epoch i // n, so a step number alone fixes
    the position in the data, which exact resume relies on.
    """

    def __init__(self, session: Session):
        self.session = session
        self.cache: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self.cache:
            self.cache = {epoch: epoch_batches(self.session, epoch)}
        return self.cache[epoch]

    def micro_batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.session.batches_per_epoch)
        return self.epoch(epoch)[position]

    def position(self, step: int) -> dict:
        """Return where optimizer step ``step`` starts in the data, for state.json and checks."""
        session = self.session
        accumulation = session.config.grad_accumulation_steps
        micro_batch = step * accumulation
        epoch, batch = divmod(micro_batch, session.batches_per_epoch)
        order = json.dumps(self.epoch(epoch)).encode()
        return {"epoch": epoch, "batch_in_epoch": batch, "micro_batch": micro_batch,
                "batches_per_epoch": session.batches_per_epoch,
                "grad_accumulation_steps": accumulation,
                # Checkpoints are written between optimizer steps, never inside an accumulation.
                "micro_batch_in_step": 0,
                "examples": len(session.train_split.examples),
                "epoch_order": hashlib.sha256(order).hexdigest()[:16]}


def rank_share(indices: list[int], group) -> list[int]:
    """Return this process's part of a global micro-batch."""
    if group is None:
        return indices
    return indices[group.rank()::group.size()]


def to_arrays(session: Session, indices: list[int]):
    """Collate examples into MLX arrays; an empty share becomes one fully masked row."""
    examples = session.train_split.examples
    pad_id = pad_token_id(session.loaded.tokenizer)

    if not indices:
        batch = collate([examples[0]], pad_id)
        batch.mask[:] = 0
    else:
        batch = collate([examples[i] for i in indices], pad_id)
    return (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)), batch


def step_batches(session: Session, order: DataOrder, step: int):
    """Return this process's micro-batches for optimizer step ``step`` and the step's totals."""
    accumulation = session.config.grad_accumulation_steps
    micro_batches, sources, normalizer, tokens = [], [], 0, 0
    for j in range(accumulation):
        indices = order.micro_batch(step * accumulation + j)
        normalizer += sum(session.train_split.examples[i].num_targets for i in indices)
        arrays, batch = to_arrays(session, rank_share(indices, session.group))
        micro_batches.append(arrays)
        sources.extend(batch.sources)
        tokens += int(batch.mask.sum())
    return micro_batches, sources, normalizer, tokens


def validation_loss(session: Session) -> float | None:
    """Return the token-weighted mean loss over the configured validation batches."""
    split = session.valid_split
    if split is None or not split.examples:
        return None

    config = session.config
    lengths = [len(e.tokens) for e in split.examples]
    batches = batch_indices(lengths, config.batch_size, seed=0, epoch=0)
    if config.val_batches >= 0:
        batches = batches[: config.val_batches]

    pad_id = pad_token_id(session.loaded.tokenizer)
    loss_sum, count = mx.array(0.0), mx.array(0.0)
    for indices in batches:
        share = rank_share(indices, session.group)
        if not share:
            continue
        batch = collate([split.examples[i] for i in share], pad_id)
        batch_loss, batch_count = session.step.loss_sum(
            mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        loss_sum, count = loss_sum + batch_loss, count + batch_count
        mx.eval(loss_sum, count)

    if session.group is not None:
        loss_sum = mx.distributed.all_sum(loss_sum, group=session.group)
        count = mx.distributed.all_sum(count, group=session.group)
    return float(loss_sum.item() / max(count.item(), 1.0))


class Trainer:
    """Runs the optimizer steps of a prepared session and writes the run folder."""

    def __init__(self, session: Session, state: TrainingState, stop: StopRequest | None = None):
        self.session = session
        self.state = state
        self.order = DataOrder(session)
        self.metrics = None
        self.stop_requested = False
        self.stop = stop
        self.data_fingerprint = data_fingerprint(session.train_split)
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.metrics_failed = False
        self.peak_compared = False

    @property
    def config(self):
        return self.session.config

    def run(self) -> TrainingState:
        session, config = self.session, self.config
        # Model loading can peak higher than training, so the reported peak starts here.
        mx.reset_peak_memory()
        if session.is_main:
            append = self.state.step > 0
            self.metrics = open_metric_sinks(
                MetricsWriter(session.run_dir / METRICS_FILE, append=append),
                config.report_to, session.run_dir, asdict(config))
        if self.state.step == 0:
            # Every process evaluates, because validation loss is summed across processes.
            self.evaluate_and_record(step=0)

        # Creating the Adam moments now, not in the first update, lets a skipped first step
        # restore a complete optimizer state.
        session.optimizer.init(session.loaded.model.trainable_parameters())
        bar = ProgressBar(session.total_steps, self.state.step, enabled=None if session.is_main else False)
        throughput, window_losses, started = Throughput(), [], time.perf_counter()
        try:
            while self.state.step < session.total_steps and not self.should_stop():
                loss, tokens = self.one_step()
                throughput.add(tokens)
                window_losses.append(loss)
                step = self.state.step

                if step % config.steps_per_report == 0 or step == session.total_steps:
                    self.report(step, window_losses, throughput.rate_and_reset(), bar)
                    window_losses = []
                # The last step is evaluated before its checkpoint, so the checkpoint contains
                # the final best-loss bookkeeping.
                last = step == session.total_steps
                if config.steps_per_eval and (step % config.steps_per_eval == 0 or last):
                    if self.evaluate_and_record(step) == "stop":
                        logger.info("early stopping: no better validation loss for %d "
                                    "evaluations", config.early_stopping_patience)
                        break
                if step % config.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()

        if self.stop is not None and self.stop.requested:
            self.stop_after_signal()
        self.finish(time.perf_counter() - started)
        return self.state

    def should_stop(self) -> bool:
        return self.stop_requested or (self.stop is not None and self.stop.requested)

    def one_step(self) -> tuple[float, int]:
        session, step = self.session, self.state.step
        micro_batches, sources, normalizer, tokens = step_batches(session, self.order, step)
        if normalizer == 0:
            logger.warning("step %d: no trainable tokens in the batch (%s); skipped",
                           step + 1, ", ".join(sources[:4]))
            self.advance_schedule()
            return float("nan"), 0

        model, optimizer = session.loaded.model, session.optimizer
        # New containers around the same (immutable) arrays: a cheap snapshot to undo the step.
        before = (model.trainable_parameters(), tree_map(lambda x: x, optimizer.state))
        loss, grad_norm = session.step(micro_batches, normalizer)
        mx.eval(loss, grad_norm, model.state, optimizer.state)
        loss_value, norm_value = loss.item(), grad_norm.item()

        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            model.update(before[0])
            replace_optimizer_state(optimizer, before[1])
            self.skip_non_finite(loss_value, norm_value, sources)
            return float("nan"), 0

        self.state.step += 1
        self.state.trained_tokens += normalizer
        return loss_value, tokens

    def skip_non_finite(self, loss: float, grad_norm: float, sources: list[str]) -> None:
        """Raise TrainingError (nan_policy stop) or log and skip the undone step (skip)."""
        step = self.state.step
        message = describe_non_finite(self.session, step, loss, grad_norm, sources)
        if self.config.nan_policy == "stop":
            if self.last_checkpoint:
                action = (f"The last checkpoint, {self.last_checkpoint}, is kept: continue from "
                          f"it with --resume {self.session.run_dir} and a lower --learning-rate")
            else:
                action = ("No checkpoint was written before this step: start again with "
                          "--overwrite and a lower --learning-rate")
            raise TrainingError(f"{message}. {action}, or pass --nan-policy skip to skip such "
                                "batches.")

        logger.warning("%s. The batch is skipped (--nan-policy skip).", message)
        self.advance_schedule()

    def advance_schedule(self) -> None:
        """Count a skipped step in the trainer and the optimizer alike.

        The optimizer's step count is the schedule position, and a checkpoint whose counts
        differ is rejected on resume.
        """
        self.state.step += 1
        self.session.optimizer.state["step"] = mx.array(self.state.step, dtype=mx.uint64)

    def record(self, values: dict) -> None:
        """Write a metrics record; a full disk loses the record but not the run."""
        try:
            self.metrics.write(values)
        except OSError as error:
            if not self.metrics_failed:
                logger.error("cannot write %s (%s); training continues without metrics "
                             "records", METRICS_FILE, error.strerror)
            self.metrics_failed = True

    def report(self, step: int, losses: list[float], tokens_per_second: float, bar) -> None:
        finite = [x for x in losses if math.isfinite(x)]
        loss = float(np.mean(finite)) if finite else float("nan")
        lr = float(self.session.schedule(step - 1))
        peak_gb = mx.get_peak_memory() / 1e9
        world = self.session.group.size() if self.session.group else 1
        rate = tokens_per_second * world
        bar.update(step, f"loss {loss:.3f} lr {lr:.2e} {rate:,.0f} tok/s")
        if not self.session.is_main:
            return
        logger.info("step %6d/%d | train loss %.4f | lr %.3e | %8.1f trained tok/s | trained tokens "
                    "%d | peak mem %.2f GB", step, self.session.total_steps, loss, lr, rate,
                    self.state.trained_tokens, peak_gb)
        if self.session.memory_plan is not None and not self.peak_compared:
            self.peak_compared = True
            logger.info("%s", compare_peak(self.session.memory_plan, mx.get_peak_memory()))
        self.record({"step": step, "train_loss": loss, "lr": lr,
                     "tokens_per_second": rate, "trained_tokens": self.state.trained_tokens,
                     "peak_memory_gb": peak_gb})

    def evaluate_and_record(self, step: int) -> str | None:
        """Compute validation loss, keep the best adapter, and apply early stopping."""
        started = time.perf_counter()
        valid = self.session.valid_split
        if step == 0 and valid is not None and self.session.is_main:
            logger.info("computing validation loss before training (%d rows)", len(valid.examples))
        val_loss = validation_loss(self.session)
        if val_loss is None:
            return None

        state = self.state
        improved = state.best_val_loss is None or val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step = val_loss, step
            state.evals_without_improvement = 0
            if self.session.is_main and step > 0:
                self.save_best()
        else:
            state.evals_without_improvement += 1

        if self.session.is_main:
            logger.info("step %6d/%d | val loss %.4f%s | %.1fs", step, self.session.total_steps,
                        val_loss, " (best)" if improved else "", time.perf_counter() - started)
            self.record({"step": step, "val_loss": val_loss,
                         "val_perplexity": math.exp(min(val_loss, 50))})

        patience = self.config.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            return "stop"
        return None

    def save_best(self) -> None:
        folder = self.session.run_dir / BEST_DIR
        try:
            save_adapter(folder, self.session.loaded.model, self.session.spec)
        except (OSError, RuntimeError) as error:
            logger.error("cannot write the best adapter to %s (%s); training continues",
                         folder, getattr(error, "strerror", None) or error)

    def fill_state(self) -> None:
        """Record the data position, schedule position and config of the current step."""
        state, session = self.state, self.session
        state.config = saved_config(self.config)
        state.data_position = self.order.position(state.step)
        state.data_fingerprint = self.data_fingerprint
        # The optimizer's next update uses schedule(step), where step counts updates so far.
        state.learning_rate = float(session.schedule(state.step))
        state.total_steps = session.total_steps

    def save_checkpoint(self, critical: bool = False) -> Path | None:
        """Write a checkpoint of the current step unless it exists; return its folder.

        A failed save is logged, and the next save tries again. A failed ``critical`` save (the
        last one of the run) is written to a rescue folder instead and raises SaveError.
        """
        if not self.session.is_main:
            return None
        if self.saved_step == self.state.step:
            return self.last_checkpoint

        self.fill_state()
        session = self.session
        try:
            folder = save_checkpoint(session.run_dir, session.loaded.model, session.optimizer,
                                     session.spec, self.state, self.config.keep_checkpoints)
        except SaveError as error:
            if critical:
                self.rescue(error)
            logger.error("%s. Training continues and the next save tries again; the last "
                         "checkpoint, %s, is intact.", error, self.last_checkpoint or "none yet")
            return None

        self.last_checkpoint, self.saved_step = folder, self.state.step
        logger.info("checkpoint written: %s", folder)
        return folder

    def rescue(self, error: SaveError) -> None:
        """Write the state to a temporary folder after a failed last save, then raise."""
        session, step = self.session, self.state.step
        try:
            root = Path(tempfile.mkdtemp(prefix="mlxlora-rescue-"))
            folder = save_checkpoint(root, session.loaded.model, session.optimizer, session.spec,
                                     self.state, keep=1)
        except (OSError, SaveError):
            last = (f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written")
            raise SaveError(f"{error}. Writing it to the temporary folder failed too; "
                            f"{last}.") from None
        raise SaveError(f"{error}. The training state of step {step} was written to {folder} "
                        f"instead. Free disk space in {session.run_dir}, then continue with: "
                        f"mlxlora train --resume {folder} --adapter-path {session.run_dir}") from None

    def stop_after_signal(self) -> None:
        """Write a checkpoint after SIGINT/SIGTERM and raise TrainingInterrupted."""
        session, step = self.session, self.state.step
        folder = self.save_checkpoint(critical=True)
        self.close_metrics()
        message = (f"stopped by {self.stop.signal_name} at step {step}/{session.total_steps}; "
                   f"checkpoint {folder}. Continue with: mlxlora train --resume {session.run_dir}")
        if session.is_main:
            logger.warning("%s", message)
        raise TrainingInterrupted(message, folder)

    def close_metrics(self) -> None:
        """Close the metrics file and sinks; safe to call twice and on a full disk."""
        metrics, self.metrics = self.metrics, None
        if metrics is None:
            return
        try:
            metrics.close()
        except OSError as error:
            logger.error("cannot finish writing %s (%s)", METRICS_FILE, error.strerror)

    def save_final_adapter(self) -> None:
        session = self.session
        try:
            save_adapter(session.run_dir, session.loaded.model, session.spec)
        except (OSError, RuntimeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise SaveError(f"cannot write the final adapter to {session.run_dir} ({reason}). "
                            f"Checkpoint {self.last_checkpoint} holds the same weights: free "
                            f"disk space, then run `mlxlora train --resume {session.run_dir}` to "
                            "write the adapter.") from None

    def finish(self, seconds: float) -> None:
        session = self.session
        if not session.is_main:
            return
        self.save_checkpoint(critical=True)
        self.save_final_adapter()
        self.close_metrics()
        write_report_after_training(session.run_dir)
        logger.info("adapter written to %s (%d steps, %.0f s)", session.run_dir,
                    self.state.step, seconds)


def write_training_config(session: Session) -> None:
    resolved = session.resolved
    content = {"config": asdict(resolved.config), "sources": resolved.sources,
               "learning_rate_used": session.learning_rate, "total_steps": session.total_steps}
    atomic_write_json(session.run_dir / TRAINING_CONFIG_FILE, content)


def saved_config(config) -> dict:
    """Return the config for state.json, with local model and data paths made absolute.

    Options left out on resume come from here, so the paths must not depend on the folder
    the run was started from.
    """
    content = asdict(config)
    for key in ("model", "data"):
        value = content.get(key)
        if isinstance(value, str) and value and Path(value).exists():
            content[key] = str(Path(value).resolve())
    return content


def space_needed(session: Session) -> int:
    """Estimate the bytes a run writes: its checkpoints (adapter plus two Adam moments each,
    keep_checkpoints + 2 at the peak of a save) and the best and final adapters."""
    adapter_bytes = sum(v.nbytes for v in adapter_weights(session.loaded.model).values())
    checkpoints = (session.config.keep_checkpoints + 2) * 3 * adapter_bytes
    return checkpoints + 2 * adapter_bytes + (1 << 20)


def restore_run(session: Session, checkpoint: Path) -> TrainingState:
    """Check that the checkpoint fits this session, load it and tidy the run folder."""
    saved = read_state(checkpoint)
    check_resume_fits(session, checkpoint, saved, DataOrder(session).position(saved.step))
    state = load_checkpoint(checkpoint, session.loaded.model, session.optimizer)
    optimizer_step = int(session.optimizer.state["step"].item())
    if optimizer_step != state.step:
        raise CheckpointError(f"{checkpoint}: the optimizer state is at step {optimizer_step}, "
                              f"state.json at step {state.step}; the checkpoint is inconsistent")
    state.config = saved_config(session.config)

    if session.is_main:
        set_aside_newer(session.run_dir, state.step)
        trim_metrics(session.run_dir / METRICS_FILE, state.step)

    lr = float(session.schedule(state.step))
    logger.info("resumed from %s at step %d/%d; the learning rate continues at %.3e",
                checkpoint, state.step, session.total_steps, lr)
    if saved.total_steps not in (None, session.total_steps):
        logger.info("the run now has %d steps instead of %d, and the schedule follows the new "
                    "length (learning rate at this step: %.3e before, %.3e now)",
                    session.total_steps, saved.total_steps, saved.learning_rate or float("nan"), lr)
    if state.step >= session.total_steps:
        logger.warning("the checkpoint is at the last step (%d of %d): only the final adapter "
                       "is written. Pass a larger --iters or --epochs to train further.",
                       state.step, session.total_steps)
    return state


def resume_target(resolved: ResolvedConfig) -> tuple[Path | None, ResolvedConfig]:
    """Find the checkpoint to resume from, if any, and merge its config into ``resolved``."""
    if not resolved.config.resume:
        return None, resolved
    checkpoint = find_checkpoint(Path(resolved.config.resume))
    saved = read_state(checkpoint)
    return checkpoint, merge_config(resolved, saved.config, checkpoint, run_folder_of(checkpoint))


def train(resolved: ResolvedConfig) -> TrainingState:
    """Run a whole training job from a resolved config and return the final state.

    Raises TrainingInterrupted, after writing a checkpoint, on SIGINT or SIGTERM.
    """
    checkpoint, resolved = resume_target(resolved)
    config = resolved.config
    check_report_to(config.report_to)
    group = distributed_group(config.batch_size)
    if group is not None and group.rank() != 0:
        # Rank 0 alone reports; other ranks log only warnings and errors.
        logger.setLevel(logging.WARNING)
    resume_folder = run_folder_of(checkpoint) if checkpoint else None
    run_dir, lock = prepare_run_dir(config, resume_folder, group is None or group.rank() == 0)
    try:
        return run_training(resolved, run_dir, checkpoint, group)
    finally:
        if lock is not None:
            lock.release()


def run_training(resolved: ResolvedConfig, run_dir: Path, checkpoint: Path | None,
                 group=None) -> TrainingState:
    for line in resolved.describe():
        logger.info("config %s", line)

    session = prepare_session(resolved, run_dir, group)
    state = TrainingState(config=saved_config(resolved.config))
    if checkpoint is not None:
        state = restore_run(session, checkpoint)

    if session.is_main:
        check_free_space(run_dir, space_needed(session))
        write_training_config(session)
        write_run_summary(session)

    with StopRequest() as stop:
        trainer = Trainer(session, state, stop)
        if checkpoint is not None:
            trainer.last_checkpoint = checkpoint
            if same_folder(checkpoint.parent.parent, run_dir):
                trainer.saved_step = state.step
        try:
            return trainer.run()
        finally:
            trainer.close_metrics()

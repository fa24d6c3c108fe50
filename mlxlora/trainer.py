"""The training loop around the compiled step: data order, reports, evaluation, saving."""

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlora.adapters import save_adapter
from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.checkpoint import TrainingState, find_latest_checkpoint, load_checkpoint, save_checkpoint
from mlxlora.config import ResolvedConfig
from mlxlora.errors import MlxloraError
from mlxlora.files import atomic_write_json
from mlxlora.metric_sinks import check_report_to, open_metric_sinks
from mlxlora.report_log import MetricsWriter, ProgressBar, Throughput
from mlxlora.run_report import write_report_after_training, write_run_summary
from mlxlora.run_dir import prepare_run_dir
from mlxlora.session import Session, epoch_batches, prepare_session

logger = logging.getLogger("mlxlora")

BEST_DIR = "best"
TRAINING_CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.jsonl"


class TrainingError(MlxloraError):
    """Training stopped on a NaN/inf loss or another failure the user must act on."""


class DataOrder:
    """The deterministic stream of micro-batches: epoch e's batches, then e + 1's, and so on.

    Micro-batch i of the run is batch i % n of epoch i // n, so a step number alone fixes
    the position in the data, which exact resume relies on.
    """

    def __init__(self, session: Session):
        self.session = session
        self.cache: dict[int, list[list[int]]] = {}

    def micro_batch(self, index: int) -> list[int]:
        per_epoch = self.session.batches_per_epoch
        epoch, position = divmod(index, per_epoch)
        if epoch not in self.cache:
            self.cache = {epoch: epoch_batches(self.session, epoch)}
        return self.cache[epoch][position]


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


def diagnose_non_finite(loss: float, session: Session, sources: list[str], step: int) -> str:
    lr = float(session.schedule(step))
    causes = [f"learning rate {lr:.3g} too high (try 3-10x lower, or `mlxlora sweep`)"]
    if session.loaded.dtype in ("float16", "bfloat16"):
        causes.append(f"{session.loaded.dtype} overflow (try --dtype float32)")
    shown = ", ".join(sources[:8]) + (" ..." if len(sources) > 8 else "")
    return (f"step {step + 1}: loss is {loss}; batch rows: {shown}. Likely causes: "
            + "; ".join(causes))


class Trainer:
    """Runs the optimizer steps of a prepared session and writes the run folder."""

    def __init__(self, session: Session, state: TrainingState):
        self.session = session
        self.state = state
        self.order = DataOrder(session)
        self.metrics = None
        self.stop_requested = False

    @property
    def config(self):
        return self.session.config

    def run(self) -> TrainingState:
        session, config = self.session, self.config
        if session.is_main:
            append = self.state.step > 0
            self.metrics = open_metric_sinks(
                MetricsWriter(session.run_dir / METRICS_FILE, append=append),
                config.report_to, session.run_dir, asdict(config))
            if not append:
                self.evaluate_and_record(step=0)

        bar = ProgressBar(session.total_steps, self.state.step, enabled=None if session.is_main else False)
        throughput, window_losses, started = Throughput(), [], time.perf_counter()
        try:
            while self.state.step < session.total_steps and not self.stop_requested:
                loss, tokens = self.one_step()
                throughput.add(tokens)
                window_losses.append(loss)
                step = self.state.step

                if step % config.steps_per_report == 0 or step == session.total_steps:
                    self.report(step, window_losses, throughput.rate_and_reset(), bar)
                    window_losses = []
                if config.steps_per_eval and step % config.steps_per_eval == 0:
                    if self.evaluate_and_record(step) == "stop":
                        logger.info("early stopping: no better validation loss for %d "
                                    "evaluations", config.early_stopping_patience)
                        break
                if step % config.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()

        self.finish(time.perf_counter() - started)
        return self.state

    def one_step(self) -> tuple[float, int]:
        session, step = self.session, self.state.step
        micro_batches, sources, normalizer, tokens = step_batches(session, self.order, step)
        if normalizer == 0:
            logger.warning("step %d: no trainable tokens in the batch (%s); skipped",
                           step + 1, ", ".join(sources[:4]))
            self.state.step += 1
            return float("nan"), 0

        previous = (session.loaded.model.trainable_parameters(), session.optimizer.state)
        loss, grad_norm = session.step(micro_batches, normalizer)
        mx.eval(loss, grad_norm, session.loaded.model.state, session.optimizer.state)
        loss_value = loss.item()

        if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
            message = diagnose_non_finite(loss_value, session, sources, step)
            if self.config.nan_policy == "stop":
                raise TrainingError(message + ". The last checkpoint is kept; resume from it "
                                              "with --resume and a lower --learning-rate.")
            logger.warning("%s; batch skipped (nan_policy=skip)", message)
            session.loaded.model.update(previous[0])
            session.optimizer.state = previous[1]
            self.state.step += 1
            return float("nan"), 0

        self.state.step += 1
        self.state.trained_tokens += normalizer
        return loss_value, tokens

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
        logger.info("step %6d/%d | train loss %.4f | lr %.3e | %8.1f tok/s | trained tokens "
                    "%d | peak mem %.2f GB", step, self.session.total_steps, loss, lr, rate,
                    self.state.trained_tokens, peak_gb)
        self.metrics.write({"step": step, "train_loss": loss, "lr": lr,
                            "tokens_per_second": rate, "trained_tokens": self.state.trained_tokens,
                            "peak_memory_gb": peak_gb})

    def evaluate_and_record(self, step: int) -> str | None:
        """Compute validation loss, keep the best adapter, and apply early stopping."""
        started = time.perf_counter()
        val_loss = validation_loss(self.session)
        if val_loss is None:
            return None

        state = self.state
        improved = state.best_val_loss is None or val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step = val_loss, step
            state.evals_without_improvement = 0
            if self.session.is_main and step > 0:
                save_adapter(self.session.run_dir / BEST_DIR, self.session.loaded.model,
                             self.session.spec)
        else:
            state.evals_without_improvement += 1

        if self.session.is_main:
            logger.info("step %6d/%d | val loss %.4f%s | %.1fs", step, self.session.total_steps,
                        val_loss, " (best)" if improved else "", time.perf_counter() - started)
            self.metrics.write({"step": step, "val_loss": val_loss,
                                "val_perplexity": math.exp(min(val_loss, 50))})

        patience = self.config.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            return "stop"
        return None

    def save_checkpoint(self) -> None:
        if not self.session.is_main:
            return
        folder = save_checkpoint(self.session.run_dir, self.session.loaded.model,
                                 self.session.optimizer, self.session.spec, self.state,
                                 self.config.keep_checkpoints)
        logger.info("checkpoint written: %s", folder)

    def finish(self, seconds: float) -> None:
        session = self.session
        if self.config.steps_per_eval and self.state.step % self.config.steps_per_eval != 0:
            self.evaluate_and_record(self.state.step)
        if not session.is_main:
            return
        self.save_checkpoint()
        save_adapter(session.run_dir, session.loaded.model, session.spec)
        if self.metrics:
            self.metrics.close()
        write_report_after_training(session.run_dir)
        logger.info("adapter written to %s (%d steps, %.0f s)", session.run_dir,
                    self.state.step, seconds)


def write_training_config(session: Session) -> None:
    resolved = session.resolved
    content = {"config": asdict(resolved.config), "sources": resolved.sources,
               "learning_rate_used": session.learning_rate, "total_steps": session.total_steps}
    atomic_write_json(session.run_dir / TRAINING_CONFIG_FILE, content)


def train(resolved: ResolvedConfig) -> TrainingState:
    """Run a whole training job from a resolved config and return the final state."""
    config = resolved.config
    check_report_to(config.report_to)
    run_dir = prepare_run_dir(config)
    for line in resolved.describe():
        logger.info("config %s", line)

    session = prepare_session(resolved, run_dir)
    state = TrainingState(config=asdict(config))
    if config.resume:
        checkpoint = find_latest_checkpoint(Path(config.resume))
        state = load_checkpoint(checkpoint, session.loaded.model, session.optimizer)
        logger.info("resumed from %s at step %d", checkpoint, state.step)

    if session.is_main:
        write_training_config(session)
        write_run_summary(session)
    return Trainer(session, state).run()

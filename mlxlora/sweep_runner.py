"""Train and score one grid point of a sweep, reusing the loaded base model.

Every point starts from the same initial adapter (kept as a copy right after attaching),
gets a fresh optimizer and schedule, reads the training examples in the same order and
sees the same number of them. The base model is loaded once for the whole sweep.
"""

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxlora.attach import lora_layers, unflatten_paths
from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.loading import LoadedModel
from mlxlora.schedule import build_schedule, default_warmup
from mlxlora.session import attach_adapter
from mlxlora.step import TrainStep
from mlxlora.sweep_grid import GridPoint

logger = logging.getLogger("mlxlora")

# A point is stopped as diverged when its loss or gradient norm is NaN or inf. It is also
# stopped when the mean train loss of its last DIVERGENCE_WINDOW steps (once there are
# DIVERGENCE_MIN_STEPS) exceeds the start loss by max(DIVERGENCE_MIN_MARGIN, start loss),
# which means the loss at least doubled. The window keeps one hard batch from counting.
DIVERGENCE_WINDOW = 5
DIVERGENCE_MIN_STEPS = 3
DIVERGENCE_MIN_MARGIN = 1.0

OK = "ok"
DIVERGED = "diverged"


def divergence_threshold(start_loss: float) -> float:
    return start_loss + max(DIVERGENCE_MIN_MARGIN, start_loss)


@dataclass
class PointResult:
    """The outcome of one grid point, as stored in sweep.json.

    ``train_losses`` has one value per optimizer step: the loss of step i's batch before
    its update, after i * effective batch size examples (None where it was NaN or inf).
    ``val_curve`` contains [examples seen, val loss] pairs, and the last pair is the score.
    ``val_loss`` is None for a diverged point.
    """

    key: str
    learning_rate: float
    batch_size: int
    rank: int
    steps: int
    examples_seen: int
    status: str
    val_loss: float | None
    reason: str | None
    seconds: float
    peak_memory_mb: float
    active_memory_mb: float
    train_losses: list[float] = field(default_factory=list)
    val_curve: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ExampleStream:
    """The training examples in one seeded order that every grid point reads.

    Epoch e is a permutation of all examples seeded with (seed, e), and epochs follow each
    other. A step at effective batch size b takes the next b positions, so after n examples
    every batch size has trained on the same examples in the same order.
    """

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        self.epochs: dict[int, list[int]] = {}

    def epoch(self, number: int) -> list[int]:
        if number not in self.epochs:
            rng = np.random.default_rng([self.seed, number])
            self.epochs[number] = rng.permutation(self.count).tolist()
        return self.epochs[number]

    def take(self, start: int, length: int) -> list[int]:
        """Return the example indices at positions start to start + length - 1."""
        indices = []
        for position in range(start, start + length):
            epoch, offset = divmod(position, self.count)
            indices.append(self.epoch(epoch)[offset])
        return indices


class EvalSet:
    """Validation batches, collated once and scored with dropout off."""

    def __init__(self, examples: list, batch_size: int, max_batches: int, pad_id: int):
        lengths = [len(example.tokens) for example in examples]
        groups = batch_indices(lengths, batch_size, seed=0, epoch=0)
        if max_batches >= 0:
            groups = groups[:max_batches]

        self.batches = []
        for group in groups:
            batch = collate([examples[i] for i in group], pad_id)
            self.batches.append((mx.array(batch.inputs), mx.array(batch.targets),
                                 mx.array(batch.mask)))
        self.num_examples = sum(len(group) for group in groups)

    def loss(self, step: TrainStep) -> float:
        """Return the token-weighted mean loss over all batches, computed as training does."""
        total, count = mx.array(0.0), mx.array(0.0)
        for inputs, targets, mask in self.batches:
            batch_total, batch_count = step.loss_sum(inputs, targets, mask)
            total, count = total + batch_total, count + batch_count
            mx.eval(total, count)
        return total.item() / max(count.item(), 1.0)


class DivergenceCheck:
    """Watch train losses and gradient norms and name the reason when a run diverges."""

    def __init__(self, start_loss: float):
        self.start_loss = start_loss
        self.threshold = divergence_threshold(start_loss)
        self.losses: list[float] = []

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Record step ``step`` (1-based); return the reason when the run diverged."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return f"loss {loss}, gradient norm {grad_norm} at step {step}"

        self.losses.append(loss)
        window = self.losses[-DIVERGENCE_WINDOW:]
        if len(window) >= DIVERGENCE_MIN_STEPS and np.mean(window) > self.threshold:
            return (f"mean train loss {np.mean(window):.3f} of the last {len(window)} steps at "
                    f"step {step} is above {self.threshold:.3f} (start loss "
                    f"{self.start_loss:.3f} plus margin)")
        return None

    def check_final(self, val_loss: float) -> str | None:
        if not math.isfinite(val_loss):
            return f"validation loss is {val_loss}"
        if val_loss > self.threshold:
            return (f"validation loss {val_loss:.3f} is above {self.threshold:.3f} (start loss "
                    f"{self.start_loss:.3f} plus margin)")
        return None


def detach_lora(model: nn.Module) -> None:
    """Put every LoRALinear's base layer back in its place."""
    bases = [(path, layer.base) for path, layer in lora_layers(model).items()]
    model.update_modules(unflatten_paths(bases))


def evaluation_steps(total_steps: int, evals: int) -> list[int]:
    """Return the 1-based steps after which to evaluate, evenly spaced, ending at total_steps."""
    count = max(1, min(evals, total_steps))
    return sorted({round(total_steps * (i + 1) / count) for i in range(count)})


class SweepRunner:
    """Run grid points one after another on one loaded model."""

    def __init__(self, config, loaded: LoadedModel, train_examples: list, eval_set: EvalSet,
                 budget: int, evals: int = 1):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.train_examples = train_examples
        self.eval_set = eval_set
        self.budget = budget
        self.evals = evals
        self.stream = ExampleStream(len(train_examples), config.seed)
        self.pad_id = pad_token_id(loaded.tokenizer)
        self.rank: int | None = None
        self.initial: list[tuple[str, mx.array]] = []

    def use_rank(self, rank: int) -> None:
        """Attach a LoRA adapter of this rank, with the seeded initialisation, once per rank."""
        if rank == self.rank:
            return
        if self.rank is not None:
            detach_lora(self.model)
        attach_adapter(replace(self.config, r=rank), self.loaded)
        # MLX arrays are immutable, so keeping these references keeps the initial values.
        self.initial = tree_flatten(self.model.trainable_parameters())
        self.rank = rank

    def reset_adapter(self) -> None:
        self.model.update(tree_unflatten(self.initial))

    def start_loss(self, rank: int) -> float:
        """Return the validation loss at the initial adapter, which equals the base model's."""
        self.use_rank(rank)
        self.reset_adapter()
        # Only loss_sum of this step is used, so it gets a do-nothing optimizer and no compile.
        step = TrainStep(self.model, optim.SGD(learning_rate=0.0), None, compile=False)
        return self.eval_set.loss(step)

    def step_batches(self, step: int, batch_size: int) -> tuple[list[tuple], int]:
        accumulation = self.config.grad_accumulation_steps
        start = step * batch_size * accumulation
        micro_batches, normalizer = [], 0
        for j in range(accumulation):
            indices = self.stream.take(start + j * batch_size, batch_size)
            examples = [self.train_examples[i] for i in indices]
            batch = collate(examples, self.pad_id)
            micro_batches.append((mx.array(batch.inputs), mx.array(batch.targets),
                                  mx.array(batch.mask)))
            normalizer += batch.num_targets
        return micro_batches, normalizer

    def build_step(self, learning_rate: float, total_steps: int):
        config = self.config
        warmup = config.warmup_steps
        if warmup is None:
            warmup = default_warmup(total_steps)
        schedule = build_schedule(learning_rate, total_steps, config.lr_schedule, warmup,
                                  config.min_lr_ratio)
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
        return optimizer, TrainStep(self.model, optimizer, config.max_grad_norm)

    def run(self, point: GridPoint, start_loss: float) -> PointResult:
        """Train one point from the initial adapter and return its scored result."""
        self.use_rank(point.rank)
        self.reset_adapter()
        mx.random.seed(self.config.seed)
        mx.reset_peak_memory()
        started = time.perf_counter()

        effective = point.batch_size * self.config.grad_accumulation_steps
        total_steps = self.budget // effective
        optimizer, train_step = self.build_step(point.learning_rate, total_steps)
        eval_after = set(evaluation_steps(total_steps, self.evals))
        check = DivergenceCheck(start_loss)
        losses, val_curve, reason, steps_done = [], [], None, 0

        for step in range(total_steps):
            micro_batches, normalizer = self.step_batches(step, point.batch_size)
            loss, grad_norm = train_step(micro_batches, normalizer)
            mx.eval(loss, grad_norm, self.model.state, optimizer.state)
            steps_done = step + 1
            losses.append(loss.item())

            reason = check.update(steps_done, loss.item(), grad_norm.item())
            if reason:
                break
            if steps_done in eval_after:
                val_curve.append([steps_done * effective, self.eval_set.loss(train_step)])

        if reason is None:
            reason = check.check_final(val_curve[-1][1])

        del train_step, optimizer
        gc.collect()
        mx.clear_cache()
        return PointResult(
            key=point.key, learning_rate=point.learning_rate, batch_size=point.batch_size,
            rank=point.rank, steps=steps_done, examples_seen=steps_done * effective,
            status=DIVERGED if reason else OK,
            val_loss=None if reason else val_curve[-1][1], reason=reason,
            seconds=round(time.perf_counter() - started, 2),
            peak_memory_mb=round(mx.get_peak_memory() / 1e6, 2),
            active_memory_mb=round(mx.get_active_memory() / 1e6, 2),
            train_losses=[_json_float(x) for x in losses],
            val_curve=[[examples, _json_float(value)] for examples, value in val_curve])


def _json_float(value: float) -> float | None:
    """Return the value rounded for sweep.json, with NaN and inf stored as null."""
    return round(value, 6) if math.isfinite(value) else None

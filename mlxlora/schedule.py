"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay."""

import mlx.core as mx
import mlx.optimizers as optim


def default_warmup(total_steps: int) -> int:
    """Return 5% of the run, at least one step, so early Adam updates stay small."""
    return max(1, round(0.05 * total_steps))


def build_schedule(peak_lr: float, total_steps: int, kind: str, warmup_steps: int,
                   min_lr_ratio: float):
    """Return a step -> learning rate callable for mlx.optimizers."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    final_lr = peak_lr * min_lr_ratio

    if kind == "constant":
        decay = lambda step: mx.array(peak_lr, dtype=mx.float32)
    elif kind == "linear":
        decay = optim.linear_schedule(peak_lr, final_lr, decay_steps)
    else:
        decay = optim.cosine_decay(peak_lr, decay_steps, final_lr)

    if warmup_steps == 0:
        return decay
    # Warmup starts one step above zero: a first step at lr 0 would be wasted.
    warmup = optim.linear_schedule(peak_lr / (warmup_steps + 1), peak_lr, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])

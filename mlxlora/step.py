"""The compiled training step: loss, gradients of the LoRA parameters, clipping, update.

The model, optimizer state and random state are captured by mx.compile, so one call runs
a whole optimizer step without leaving the compiled graph. With gradient accumulation the
step is split into a compiled gradient function, called once per micro-batch, and a
compiled update.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxlora.loss import masked_loss


def sum_across_processes(tree, group):
    """Sum a tree of arrays over all processes; a no-op in a single process."""
    if group is None or group.size() == 1:
        return tree
    return tree_map(lambda x: mx.distributed.all_sum(x, group=group), tree)


def clip_gradients(grads, max_grad_norm: float | None):
    if max_grad_norm is None:
        norm = optim.clip_grad_norm(grads, float("inf"))[1]
        return grads, norm
    return optim.clip_grad_norm(grads, max_grad_norm)


class TrainStep:
    """Compiled functions for one optimizer step and for validation loss.

    ``group`` is an mx.distributed group for data-parallel runs, or None.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer,
                 max_grad_norm: float | None, group=None, compile: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.group = group
        state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        wrap = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)

        def full_step(inputs, targets, mask, normalizer):
            loss, grads = loss_and_grad(model, inputs, targets, mask, normalizer)
            loss, grads = sum_across_processes((loss, grads), group)
            grads, norm = clip_gradients(grads, max_grad_norm)
            optimizer.update(model, grads)
            return loss, norm

        def gradients(inputs, targets, mask, normalizer):
            return loss_and_grad(model, inputs, targets, mask, normalizer)

        def update(loss, grads):
            loss, grads = sum_across_processes((loss, grads), group)
            grads, norm = clip_gradients(grads, max_grad_norm)
            optimizer.update(model, grads)
            return loss, norm

        def evaluate(inputs, targets, mask):
            logits = model(inputs).astype(mx.float32)
            losses = nn.losses.cross_entropy(logits, targets, reduction="none")
            return (losses * mask).sum(), mask.sum()

        self._full_step = wrap(full_step)
        self._gradients = wrap(gradients)
        self._update = wrap(update)
        # Not compiled: a compiled graph would keep the dropout mode it was traced with.
        self._evaluate = evaluate

    def __call__(self, micro_batches: list[tuple], normalizer: float):
        """Run one optimizer step over micro-batches of (inputs, targets, mask) arrays.

        Returns (loss, gradient norm) as lazy arrays: the loss is the token-weighted mean over
        the whole step (all micro-batches and processes).
        """
        count = mx.array(normalizer, dtype=mx.float32)
        if len(micro_batches) == 1:
            inputs, targets, mask = micro_batches[0]
            return self._full_step(inputs, targets, mask, count)

        total_loss, total_grads = None, None
        for inputs, targets, mask in micro_batches:
            loss, grads = self._gradients(inputs, targets, mask, count)
            if total_grads is None:
                total_loss, total_grads = loss, grads
            else:
                total_loss = total_loss + loss
                total_grads = tree_map(mx.add, total_grads, grads)
            mx.eval(total_loss, total_grads)
        return self._update(total_loss, total_grads)

    def loss_sum(self, inputs, targets, mask):
        """Return (sum of token losses, number of target tokens) for one batch, dropout off."""
        self.model.eval()
        try:
            return self._evaluate(inputs, targets, mask)
        finally:
            self.model.train()

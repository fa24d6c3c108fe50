"""The compiled training step: loss, gradients of the LoRA parameters, clipping, update.

The model, optimizer state and random state are captured by mx.compile, so one call runs
a whole optimizer step without leaving the compiled graph. With gradient accumulation the
step is split into a compiled gradient function, called once per micro-batch, and a
compiled update.

When the model splits into body and output projection (mlxlora.output_head), the loss
projects only the target positions. The host picks them from the mask before the step, so
the compiled graph gets fixed shapes and needs no host synchronisation.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxlora.loss import (fused_cross_entropy, masked_loss, select_targets, selected_loss,
                          selected_loss_sum)
from mlxlora.output_head import find_output_head


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


def batch_loss_function(head):
    """Return loss(model, normalizer, *batch_arrays) for the arrays that prepare_batch makes."""
    if head is None:
        def full_logits_loss(model, normalizer, inputs, targets, mask):
            return masked_loss(model, inputs, targets, mask, normalizer)
        return full_logits_loss

    fused = fused_cross_entropy(head.matrix) if head.matrix else None

    def target_logits_loss(model, normalizer, inputs, positions, targets, weights):
        return selected_loss(head, fused, inputs, positions, targets, weights, normalizer)
    return target_logits_loss


class TrainStep:
    """Compiled functions for one optimizer step and for validation loss.

    ``group`` is an mx.distributed group for data-parallel runs, or None.
    ``select_logits=False`` forces the full-logits loss, which gives the same values.

    ``tokens_per_step`` is the mean number of target tokens per optimizer step over an
    epoch. When it is set, each step divides its summed token loss by this constant
    instead of by its own token count, so every target token of the epoch has the same
    weight. Length-sorted batches hold examples of similar length, and the per-step mean
    gives the tokens of a short batch several times the weight of those of a long one.
    On 128 wwdc25 rows (SmolLM2-135M, 16 steps) the per-step mean ended at validation loss
    2.20 and the constant at 2.12; docs/benchmarks.md has the runs.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer,
                 max_grad_norm: float | None, group=None, compile: bool = True,
                 select_logits: bool = True, tokens_per_step: float | None = None):
        if tokens_per_step is not None and tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step must be positive, got {tokens_per_step}")
        self.model = model
        self.optimizer = optimizer
        self.group = group
        self.tokens_per_step = tokens_per_step
        self.head = find_output_head(model) if select_logits else None
        state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, batch_loss_function(self.head))
        wrap = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)

        def full_step(normalizer, *batch):
            loss, grads = loss_and_grad(model, normalizer, *batch)
            loss, grads = sum_across_processes((loss, grads), group)
            grads, norm = clip_gradients(grads, max_grad_norm)
            optimizer.update(model, grads)
            return loss, norm

        def gradients(normalizer, *batch):
            return loss_and_grad(model, normalizer, *batch)

        def update(loss, grads):
            loss, grads = sum_across_processes((loss, grads), group)
            grads, norm = clip_gradients(grads, max_grad_norm)
            optimizer.update(model, grads)
            return loss, norm

        def evaluate(inputs, targets, mask):
            if self.head is not None:
                selection = select_targets(np.array(targets), np.array(mask))
                return selected_loss_sum(self.head, inputs, selection.positions,
                                         selection.targets, selection.weights)
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

        ``normalizer`` is the number of target tokens in the step (all micro-batches and
        processes). Returns (loss, gradient norm) as lazy arrays: the loss is the
        token-weighted mean over the whole step, with or without ``tokens_per_step``.
        """
        divisor = self.tokens_per_step or normalizer
        loss, norm = self._step(micro_batches, mx.array(divisor, dtype=mx.float32))
        if divisor != normalizer and normalizer > 0:
            loss = loss * (divisor / normalizer)
        return loss, norm

    def _step(self, micro_batches: list[tuple], count: mx.array):
        if len(micro_batches) == 1:
            return self._full_step(count, *self.prepare_batch(*micro_batches[0]))

        total_loss, total_grads = None, None
        for micro_batch in micro_batches:
            loss, grads = self._gradients(count, *self.prepare_batch(*micro_batch))
            if total_grads is None:
                total_loss, total_grads = loss, grads
            else:
                total_loss = total_loss + loss
                total_grads = tree_map(mx.add, total_grads, grads)
            mx.eval(total_loss, total_grads)
        return self._update(total_loss, total_grads)

    def prepare_batch(self, inputs, targets, mask) -> tuple:
        """Return the arrays the compiled loss takes: the batch itself, or its target rows."""
        if self.head is None:
            return inputs, targets, mask
        selection = select_targets(np.array(targets), np.array(mask))
        return inputs, selection.positions, selection.targets, selection.weights

    def loss_sum(self, inputs, targets, mask):
        """Return (sum of token losses, number of target tokens) for one batch, dropout off."""
        self.model.eval()
        try:
            return self._evaluate(inputs, targets, mask)
        finally:
            self.model.train()

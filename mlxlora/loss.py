"""Masked next-token cross-entropy, normalised by a token count given by the caller.

The caller passes the number of target tokens in the whole optimizer step (all
micro-batches, all processes). Each micro-batch then contributes sum(ce * mask) / that
count, so summing gradients over micro-batches and processes gives exactly the gradient of
the token-weighted mean loss of the full step.

``masked_loss`` projects every position to logits. ``selected_loss`` computes the same
value from the hidden states of the target positions only (chosen on the host by
``select_targets``), so the output projection and the softmax skip prompt and padding
positions. When the projection is a frozen matrix, its cross-entropy is fused: the forward
pass computes the logits, the loss and the gradient of the hidden states together. The
logits are then not kept for the backward pass, and exp runs once per logit instead of
twice (logsumexp forward, softmax backward).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlora.output_head import OutputHead, ProjectionMatrix

# Selected rows are padded up to a multiple of this, so mx.compile traces few distinct shapes.
ROW_MULTIPLE = 64


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
                normalizer: mx.array) -> mx.array:
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * mask).sum() / normalizer


@dataclass
class TargetSelection:
    """Flat (B * L) indices of the target positions of a batch, their targets and weights.

    Entries past the real targets pad the count to a multiple of ROW_MULTIPLE; they point at
    position 0 with weight 0, so they add nothing to the loss or the gradients.
    """

    positions: mx.array
    targets: mx.array
    weights: mx.array


def select_targets(targets: np.ndarray, mask: np.ndarray,
                   row_multiple: int = ROW_MULTIPLE) -> TargetSelection:
    """Select the positions whose mask is non-zero, from host (numpy) batch arrays."""
    flat_mask = np.asarray(mask, dtype=np.float32).reshape(-1)
    positions = np.flatnonzero(flat_mask)
    padded = max(row_multiple, -(-len(positions) // row_multiple) * row_multiple)

    selected = np.zeros(padded, dtype=np.int32)
    selected[:len(positions)] = positions
    weights = np.zeros(padded, dtype=np.float32)
    weights[:len(positions)] = flat_mask[positions]
    picked = np.asarray(targets).reshape(-1)[selected].astype(np.int32)
    return TargetSelection(mx.array(selected), mx.array(picked), mx.array(weights))


def selected_hidden(head: OutputHead, inputs: mx.array, positions: mx.array) -> mx.array:
    """Return the final hidden states at the flat positions, shape (K, H)."""
    hidden = head.body(inputs)
    return hidden.reshape(-1, hidden.shape[-1])[positions]


def _losses_and_gradient(matrix: ProjectionMatrix, hidden: mx.array, targets: mx.array):
    """Return per-row losses and the unscaled gradient d loss_i / d hidden_i.

    The gradient is softmax(z) @ W - W[t], computed as (exp(z - max) @ W) / sum: dividing
    the (K, H) product instead of the (K, vocab) exponentials saves one (K, vocab) buffer,
    which measured 683 MB instead of 1023 MB for 1728 rows of a 49k vocabulary.
    """
    matrix = matrix.for_one_pass()
    logits = matrix.logits(hidden).astype(mx.float32)
    peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    exponentials = mx.exp(logits - peak)
    total = exponentials.sum(axis=-1, keepdims=True)
    losses = (peak + mx.log(total) - picked)[:, 0]

    weighted = matrix.backproject(exponentials.astype(hidden.dtype))
    gradient = weighted / total.astype(hidden.dtype) - matrix.rows(targets).astype(hidden.dtype)
    return losses, gradient


def fused_cross_entropy(matrix: ProjectionMatrix):
    """Return f(hidden (K, H), targets (K,)) -> per-row cross-entropy (K,) with a fused vjp.

    The forward pass also computes d loss_i / d hidden_i = softmax(z_i) @ W - W[t_i], so the
    backward pass only scales it by the incoming cotangent. The matrix is treated as a
    constant: find_output_head offers this path only for frozen matrices.
    """

    @mx.custom_function
    def cross_entropy(hidden, targets):
        return _losses_and_gradient(matrix, hidden, targets)

    @cross_entropy.vjp
    def cross_entropy_vjp(primals, cotangents, outputs):
        _, targets = primals
        scale = cotangents[0][:, None].astype(outputs[1].dtype)
        return scale * outputs[1], mx.zeros_like(targets)

    def losses_only(hidden, targets):
        return cross_entropy(hidden, targets)[0]

    return losses_only


def row_losses(head: OutputHead, hidden: mx.array, targets: mx.array, fused=None) -> mx.array:
    """Return the cross-entropy of each selected row; ``fused`` is fused_cross_entropy's output."""
    if fused is not None:
        return fused(hidden, targets)
    logits = head.project(hidden).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def selected_loss(head: OutputHead, fused, inputs: mx.array, positions: mx.array,
                  targets: mx.array, weights: mx.array, normalizer: mx.array) -> mx.array:
    """Return sum(ce * weight) / normalizer over the selected positions; equals masked_loss."""
    hidden = selected_hidden(head, inputs, positions)
    losses = row_losses(head, hidden, targets, fused)
    return (losses * weights).sum() / normalizer


def selected_loss_sum(head: OutputHead, inputs: mx.array, positions: mx.array,
                      targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """Return (sum of weighted token losses, sum of weights) without building gradients."""
    hidden = selected_hidden(head, inputs, positions)
    losses = row_losses(head, hidden, targets)
    return (losses * weights).sum(), weights.sum()


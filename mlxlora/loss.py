"""Masked next-token cross-entropy, normalised by a token count given by the caller.

The caller passes the number of target tokens in the whole optimizer step (all
micro-batches, all processes). Each micro-batch then contributes sum(ce * mask) / that
count, so summing gradients over micro-batches and processes gives exactly the gradient of
the token-weighted mean loss of the full step.
"""

import mlx.core as mx
import mlx.nn as nn


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
                normalizer: mx.array) -> mx.array:
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * mask).sum() / normalizer

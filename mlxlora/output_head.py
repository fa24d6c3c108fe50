"""Split a causal language model into its body and its output projection.

The body maps tokens (B, L) to final hidden states (B, L, H); the projection maps hidden
states to logits over the vocabulary. Splitting them lets the loss project only the
positions that have a target, which for a 49k vocabulary and completion-only training skips
a large share of the step. mlx-lm models keep the body in ``model.model`` and project with
``model.lm_head`` or, with tied embeddings, ``model.model.embed_tokens.as_linear``. A model
whose forward does anything else after that (logit scaling or soft-capping, say) fails the
numerical check in ``find_output_head`` and keeps the full-logits loss.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.dequantized_matmul import (DequantizedMatmulEmbedding, DequantizedMatmulLinear,
                                        dequantized_weight)

logger = logging.getLogger("mlxlora")

# Tokens of the probe sequence that checks body + projection against the model's forward.
PROBE_LENGTH = 4

DEQUANTIZING = (DequantizedMatmulEmbedding, DequantizedMatmulLinear)


class ProjectionMatrix:
    """A frozen output matrix W of shape (vocab, hidden), float or quantized.

    Provides the three products the fused cross-entropy needs: h @ W.T, p @ W and W[ids].
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))

    def _quantized_product(self, x: mx.array, transpose: bool) -> mx.array:
        module = self.module
        return mx.quantized_matmul(x, module["weight"], scales=module["scales"],
                                   biases=module.get("biases"), transpose=transpose,
                                   group_size=module.group_size, bits=module.bits,
                                   mode=getattr(module, "mode", "affine"))

    def for_one_pass(self) -> "ProjectionMatrix":
        """Return the matrix to use for one loss evaluation.

        A layer that multiplies by its dequantized weight (mlxlora.dequantized_matmul) is
        dequantized once here, so the logits and the back-projection share one float copy.
        With a copy for each, the loss of 1,327 rows on a 49k x 576 head peaked 112 MB higher.
        """
        if isinstance(self.module, DEQUANTIZING):
            return ProjectionMatrix({"weight": dequantized_weight(self.module)})
        return self

    def logits(self, hidden: mx.array) -> mx.array:
        if self.quantized:
            return self._quantized_product(hidden, transpose=True)
        return hidden @ self.module["weight"].T

    def backproject(self, probabilities: mx.array) -> mx.array:
        if self.quantized:
            return self._quantized_product(probabilities, transpose=False)
        return probabilities @ self.module["weight"]

    def rows(self, ids: mx.array) -> mx.array:
        module = self.module
        if not self.quantized:
            return module["weight"][ids]
        biases = module.get("biases")
        return mx.dequantize(module["weight"][ids], scales=module["scales"][ids],
                             biases=biases[ids] if biases is not None else None,
                             group_size=module.group_size, bits=module.bits,
                             mode=getattr(module, "mode", "affine"))


@dataclass
class OutputHead:
    """The body and projection of a model; ``matrix`` is set when the fused loss can be used."""

    body: Callable[[mx.array], mx.array]
    project: Callable[[mx.array], mx.array]
    matrix: ProjectionMatrix | None
    vocab_size: int


def _candidate(model: nn.Module) -> tuple[Callable, nn.Module, Callable] | None:
    """Return (body, projection module, projection function) by mlx-lm's layout, or None."""
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        return None

    args = getattr(model, "args", None)
    tied = getattr(args, "tie_word_embeddings", None)
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module) and not tied:
        return body, lm_head, lm_head

    embed = getattr(body, "embed_tokens", None)
    if isinstance(embed, nn.Module) and hasattr(embed, "as_linear"):
        return body, embed, embed.as_linear
    return None


def _is_frozen_matrix(module: nn.Module) -> bool:
    """Return whether the module is a bias-free, untrained (vocab, hidden) matrix."""
    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding) + DEQUANTIZING
    if type(module) not in kinds or "bias" in module:
        return False
    return not tree_flatten(module.trainable_parameters())


def _checked_vocab_size(model: nn.Module, body: Callable, project: Callable) -> int | None:
    """Return the vocabulary size if project(body(x)) equals model(x) on a short probe.

    Dropout is switched off for the check; None means the split does not reproduce the model.
    """
    probe = mx.arange(PROBE_LENGTH)[None]
    was_training = model.training
    model.eval()
    try:
        expected = model(probe).astype(mx.float32)
        actual = project(body(probe)).astype(mx.float32)
        if expected.shape != actual.shape:
            return None
        if not mx.allclose(expected, actual, rtol=1e-4, atol=1e-4).item():
            return None
        return expected.shape[-1]
    except (TypeError, ValueError, AttributeError) as error:
        logger.debug("output head check failed: %s", error)
        return None
    finally:
        model.train(was_training)


def find_output_head(model: nn.Module) -> OutputHead | None:
    """Return the model's body and projection, or None when they cannot be split safely."""
    candidate = _candidate(model)
    if candidate is None:
        return None

    body, module, project = candidate
    vocab_size = _checked_vocab_size(model, body, project)
    if vocab_size is None:
        logger.debug("output head: %s computes more than body + projection; using full logits",
                     type(model).__name__)
        return None

    matrix = ProjectionMatrix(module) if _is_frozen_matrix(module) else None
    return OutputHead(body, project, matrix, vocab_size)

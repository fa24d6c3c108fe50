"""The LoRA layer: a frozen linear layer plus a trainable low-rank update.

y = base(x) + scaling * dropout(x) @ A.T @ B.T, with A of shape (r, in_features) and B of
shape (out_features, r), the same layout as Hugging Face PEFT's lora_A.weight and
lora_B.weight, so adapters convert without transposes.
"""

import math

import mlx.core as mx
import mlx.nn as nn


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """Return the factor applied to B @ A: lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA.

    rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
    LoRA") divides by sqrt(r) so that the update's magnitude does not shrink as r grows.
    """
    if use_rslora:
        return lora_alpha / math.sqrt(r)
    return lora_alpha / r


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """Return (out_features, in_features) of a float or quantized linear layer."""
    out_features, stored_in = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return out_features, stored_in * 32 // layer.bits
    return out_features, stored_in


class LoRALinear(nn.Module):
    """A linear layer (float or quantized) with a LoRA update; only lora_A and lora_B train."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        out_features, in_features = linear_shape(base)

        self.base = base
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.dropout = nn.Dropout(p=lora_dropout)

        # A uniform in +-1/sqrt(in_features), as PEFT's kaiming_uniform_(a=sqrt(5)) gives for a
        # Linear; B zero, so the adapted model starts exactly equal to the base model.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_features), dtype=mx.float32)
        self.lora_B = mx.zeros((out_features, r), dtype=mx.float32)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        update = (self.dropout(x) @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return y + (self.scaling * update).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """Return scaling * B @ A, the change this adapter makes to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

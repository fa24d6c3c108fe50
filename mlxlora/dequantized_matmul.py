"""Quantized base layers on a CPU: dequantize each weight for its matmul, then use BLAS.

MLX's CPU ``quantized_matmul`` does not use BLAS. On a 2-core x86_64 VM (mlx 0.32.4,
OpenBLAS) a (512 x 576) @ (576 x 1536) product ran at 3.7-8.9 GFLOP/s quantized and at
185 GFLOP/s as dequantize + float32 matmul (benchmarks/dequantized_matmul.py).

The weights stay quantized in memory, as QLoRA needs. The backward pass dequantizes each
weight again instead of keeping the forward pass's float copy, so float copies are
temporaries. Through the forward and backward pass of a 30-layer stack with 212 MB of
float32 weights, compiled, the peak was 574 MB with this product, 878 MB with autodiff
through dequantize and 761 MB with quantized_matmul (the same script).

The result equals ``quantized_matmul`` up to float32 summation order. Only this model's
affine ``QuantizedLinear`` and ``QuantizedEmbedding`` instances change class, as in
mlxlora.lean_mlp. Other quantization modes keep MLX's kernel.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn


@lru_cache(maxsize=None)
def dequantized_product(group_size: int, bits: int, transpose: bool):
    """Return f(x, weight, scales, biases) = x @ W.T (or x @ W), W the float weight.

    The gradient reaches x only, because the quantized weights are frozen.
    """
    def weight(w, scales, biases):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)

    @mx.custom_function
    def product(x, w, scales, biases):
        matrix = weight(w, scales, biases).astype(x.dtype)
        return x @ (matrix.T if transpose else matrix)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # Without this dependency, mx.compile merges this dequantize with the forward pass's
        # and keeps every float weight until the backward pass: 4.44 GB instead of 3.98 GB
        # peak for SmolLM2-135M on 8 x 256 tokens (benchmarks/step_memory.py --quantized).
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])
        matrix = weight(w, scales, biases).astype(cotangent.dtype)
        d_x = cotangent @ (matrix if transpose else matrix.T)
        return d_x, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return product


def supported(module: nn.Module) -> bool:
    """Return whether a quantized layer can use the dequantized product (affine with biases)."""
    return (getattr(module, "mode", "affine") == "affine"
            and module.get("biases") is not None)


def dequantized_weight(module: nn.Module) -> mx.array:
    """Return a quantized layer's weight as a float matrix (the dtype of affine scales)."""
    return mx.dequantize(module["weight"], module["scales"], module.get("biases"),
                         group_size=module.group_size, bits=module.bits,
                         mode=getattr(module, "mode", "affine"))


def quantized_product(module: nn.Module, x: mx.array, transpose: bool = True) -> mx.array:
    """Return x @ W.T (or x @ W) for a quantized module, by the dequantized product."""
    product = dequantized_product(module.group_size, module.bits, transpose)
    return product(x, module["weight"], module["scales"], module["biases"])


class DequantizedMatmulEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose output projection (tied embeddings) uses the float product."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_product(self, x)


class DequantizedMatmulLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose forward dequantizes its weight and multiplies in float."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_product(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


def use_dequantized_matmul(model: nn.Module) -> int:
    """Give each affine QuantizedLinear and QuantizedEmbedding of ``model`` the float product.

    Returns the number of layers changed. Use it for training on a CPU only. On a GPU, MLX's
    quantized_matmul kernels read the 4-bit weights directly (this product was not measured
    against them there). When generating one token at a time, dequantizing a whole weight
    costs more than the quantized product of one row: 2.3 ms against 0.5 ms for 576 x 1536.
    """
    subclasses = {nn.QuantizedLinear: DequantizedMatmulLinear,
                  nn.QuantizedEmbedding: DequantizedMatmulEmbedding}
    changed = 0
    for _, module in model.named_modules():
        subclass = subclasses.get(type(module))
        if subclass is not None and supported(module):
            module.__class__ = subclass
            changed += 1
    return changed

"""Model FLOPs of a LoRA training step, counted from the model shapes, and the matmul peak.

Counted per sequence of n input positions (one multiply-add = 2 FLOPs):

- frozen linear layers: forward 2*n*in*out, plus the same again for the input gradient of
  the backward pass (frozen weights need no weight gradient);
- LoRA adapters (A: r x in, B: out x r): forward, input gradient and weight gradients,
  each 2*n*r*(in + out);
- attention scores and weighted values: forward 4*n^2*d, backward 8*n^2*d with
  d = heads * head_dim, counting the full n x n matrices as MLX computes them;
- the output projection at the k positions that have a target: forward and input gradient,
  2*k*hidden*vocab each.

Element-wise work (norms, RoPE, softmax, SiLU, the optimizer) is not counted, and neither is
the input gradient of the first block, which no parameter needs. This is the work the
training math requires; padding and logits at positions without a target are not counted,
so both tools are measured against the same number.
"""

import time
from dataclasses import dataclass

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx


@dataclass
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"])

    def block_linears(self) -> list[tuple[int, int]]:
        """Return (in, out) of the seven linear layers of a llama block."""
        attention = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return [(self.hidden, attention), (self.hidden, kv), (self.hidden, kv),
                (attention, self.hidden), (self.hidden, self.intermediate),
                (self.hidden, self.intermediate), (self.intermediate, self.hidden)]


def sequence_flops(shape: ModelShape, positions: int, targets: int, rank: int) -> dict:
    """Return FLOPs by part for one sequence with LoRA on every block linear layer."""
    n = positions
    linears = shape.block_linears()
    frozen = sum(2 * n * i * o for i, o in linears) * 2 * shape.layers
    adapters = sum(2 * n * rank * (i + o) for i, o in linears) * 3 * shape.layers
    attention = 12 * n * n * shape.heads * shape.head_dim * shape.layers
    output = 2 * 2 * targets * shape.hidden * shape.vocab
    return {"linear": frozen, "lora": adapters, "attention": attention, "lm_head": output}


def workload_flops(shape: ModelShape, sequences: list[tuple[int, int]], rank: int) -> dict:
    """Sum sequence_flops over (input positions, target count) pairs; adds a "total" key."""
    parts = {"linear": 0, "lora": 0, "attention": 0, "lm_head": 0}
    for positions, targets in sequences:
        for name, value in sequence_flops(shape, positions, targets, rank).items():
            parts[name] += value
    parts["total"] = sum(parts.values())
    return parts


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Return the best float32 matmul rate in FLOP/s of MLX's default device, measured now.

    The best of several runs is taken because other processes can only slow a run down.
    """
    a = mx.random.normal((size, size), dtype=mx.float32)
    b = mx.random.normal((size, size), dtype=mx.float32)
    mx.eval(a, b, a @ b)

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best

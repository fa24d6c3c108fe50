"""Split the time of one LoRA training step into its parts, to explain its MFU.

    python benchmarks/step_breakdown.py MODEL_FOLDER [--batch 8] [--length 192] [--targets 152]

MODEL_FOLDER is an MLX model folder with config.json (benchmarks/prepare.py writes the
float32 SmolLM2 one). Each part runs alone, with the model's shapes, on random float32
data, on MLX's default device. Each time is the best of 3 runs, for all blocks together:

- frozen linear layers: forward x @ W.T and input gradient g @ W (BLAS);
- LoRA adapters: forward, input gradient and both weight gradients, rank --rank;
- attention: scores and weighted values, forward and backward, as six matmuls, and the
  softmax with its backward, as element-wise work;
- SwiGLU: silu(gate) * up with its backward (element-wise);
- output projection at the target rows: two matmuls, and the exponentials of the fused
  cross-entropy (element-wise).

The matmul parts give the time the counted FLOPs (benchmarks/flops.py) need at the rate
this backend reaches on these shapes. The element-wise parts show what else a step pays.
Norms, RoPE, residual adds and the optimizer are not timed.
"""

import argparse
import json
import time
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from flops import ModelShape, matmul_peak, sequence_flops

REPEATS = 3


def best_time(run) -> float:
    """Return the shortest wall time of REPEATS calls of run(), after one warm-up call."""
    mx.eval(run())
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - started)
    return best


def normal(*shape) -> mx.array:
    value = mx.random.normal(shape) * 0.02
    mx.eval(value)
    return value


def linear_parts(shape: ModelShape, tokens: int, rank: int) -> dict:
    """Return the seconds that the frozen and the LoRA matmuls of all blocks take."""
    layers = shape.block_linears()
    weights = [normal(o, i) for i, o in layers]
    inputs = [normal(tokens, i) for i, _ in layers]
    grads = [normal(tokens, o) for _, o in layers]
    adapters = [(normal(rank, i), normal(o, rank)) for i, o in layers]

    def frozen():
        return [out for w, x, g in zip(weights, inputs, grads) for out in (x @ w.T, g @ w)]

    def lora():
        outputs = []
        for (a, b), x, g in zip(adapters, inputs, grads):
            down = x @ a.T
            g_down = g @ b
            outputs += [down @ b.T, g_down @ a, g.T @ down, g_down.T @ x]
        return outputs

    return {"frozen linear (matmul)": best_time(frozen) * shape.layers,
            "LoRA adapters (matmul)": best_time(lora) * shape.layers}


def attention_parts(shape: ModelShape, batch: int, length: int) -> dict:
    q, k, v = (normal(batch, shape.heads, length, shape.head_dim) for _ in range(3))
    scores = normal(batch, shape.heads, length, length)
    mask = nn.MultiHeadAttention.create_additive_causal_mask(length)

    def matmuls():
        # Forward: scores and weighted values. Backward: the gradients of the probabilities,
        # the values, the queries and the keys.
        return [q @ k.swapaxes(-1, -2), scores @ v, v @ k.swapaxes(-1, -2),
                scores.swapaxes(-1, -2) @ v, scores @ k, scores.swapaxes(-1, -2) @ q]

    def softmax():
        probs = mx.softmax(scores + mask, axis=-1, precise=True)
        return probs * (scores - (scores * probs).sum(-1, keepdims=True))

    return {"attention (matmul)": best_time(matmuls) * shape.layers,
            "attention softmax (element-wise)": best_time(softmax) * shape.layers}


def swiglu_part(shape: ModelShape, tokens: int) -> dict:
    gate, up, cotangent = (normal(tokens, shape.intermediate) for _ in range(3))

    def swiglu():
        sigmoid = mx.sigmoid(gate)
        silu = gate * sigmoid
        return [silu * up, cotangent * silu, cotangent * up * (sigmoid + silu * (1 - sigmoid)),
                mx.sigmoid(gate)]

    return {"SwiGLU (element-wise)": best_time(swiglu) * shape.layers}


def head_parts(shape: ModelShape, rows: int) -> dict:
    matrix = normal(shape.vocab, shape.hidden)
    hidden = normal(rows, shape.hidden)
    logits = hidden @ matrix.T
    mx.eval(logits)

    def matmuls():
        return [hidden @ matrix.T, logits @ matrix]

    def exponentials():
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return mx.exp(shifted).sum(axis=-1)

    return {"output projection (matmul)": best_time(matmuls),
            "cross-entropy exp (element-wise)": best_time(exponentials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="MLX model folder with config.json.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=192, help="Padded batch width.")
    parser.add_argument("--targets", type=int, default=152, help="Target tokens per row.")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    shape = ModelShape.from_config(config)
    tokens, rows = args.batch * args.length, args.batch * args.targets
    flops = {name: value * args.batch
             for name, value in sequence_flops(shape, args.length, args.targets, args.rank).items()}

    peak = matmul_peak()
    parts = {}
    parts.update(linear_parts(shape, tokens, args.rank))
    parts.update(attention_parts(shape, args.batch, args.length))
    parts.update(swiglu_part(shape, tokens))
    parts.update(head_parts(shape, rows))

    total_flops = sum(flops.values())
    matmul_seconds = sum(t for name, t in parts.items() if "matmul" in name)
    print(f"batch {args.batch} x {args.length}, {rows} target rows; model FLOPs per step "
          f"{total_flops / 1e9:.0f} G; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print("\n| part | seconds per step |\n| --- | ---: |")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"\nmatmul parts: {matmul_seconds:.2f} s, {total_flops / matmul_seconds / 1e9:.0f} "
          f"GFLOP/s, {total_flops / matmul_seconds / peak:.0%} of the peak")
    print(f"all timed parts: {sum(parts.values()):.2f} s, MFU at most "
          f"{total_flops / sum(parts.values()) / peak:.0%}")


if __name__ == "__main__":
    main()

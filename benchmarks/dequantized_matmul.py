"""Speed and memory of quantized products on this machine: quantized_matmul against
dequantize + float32 matmul (mlxlora.dequantized_matmul).

    python benchmarks/dequantized_matmul.py [--rows 512] [--bits 4]

Part 1 times one (rows x 576) @ (576 x 1536) product, SmolLM2-135M's MLP shape, four ways.
Part 2 runs the forward and backward pass of a 30-layer stack of such 4-bit layers with a
sine between them, eager and under mx.compile. It prints the peak MLX memory above the
arrays that existed before, for three products: mlxlora's, plain autodiff through
dequantize (which keeps each float weight for the backward pass) and quantized_matmul.
"""

import argparse
import time

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from mlxlora.dequantized_matmul import dequantized_product

HIDDEN, INTERMEDIATE, GROUP_SIZE = 576, 1536, 32


def seconds_per_call(function, repeats: int = 5) -> float:
    mx.eval(function())
    started = time.perf_counter()
    for _ in range(repeats):
        mx.eval(function())
    return (time.perf_counter() - started) / repeats


def time_products(rows: int, bits: int) -> None:
    x = mx.random.normal((rows, HIDDEN))
    y = mx.random.normal((rows, INTERMEDIATE))
    weight = mx.random.normal((INTERMEDIATE, HIDDEN))
    quantized = mx.quantize(weight, group_size=GROUP_SIZE, bits=bits)
    mx.eval(x, y, weight, quantized)
    forward = dequantized_product(GROUP_SIZE, bits, True)
    backward = dequantized_product(GROUP_SIZE, bits, False)

    cases = {
        "quantized_matmul, x @ W.T": lambda: mx.quantized_matmul(
            x, *quantized, transpose=True, group_size=GROUP_SIZE, bits=bits),
        "quantized_matmul, y @ W": lambda: mx.quantized_matmul(
            y, *quantized, transpose=False, group_size=GROUP_SIZE, bits=bits),
        "dequantize + matmul, x @ W.T": lambda: forward(x, *quantized),
        "dequantize + matmul, y @ W": lambda: backward(y, *quantized),
        "float32 matmul, x @ W.T": lambda: x @ weight.T,
    }
    flops = 2 * rows * HIDDEN * INTERMEDIATE
    for name, function in cases.items():
        seconds = seconds_per_call(function)
        print(f"{name:32s} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:7.1f} GFLOP/s")


def stack_peak(kind: str, bits: int, compiled: bool, layers: int = 30) -> float:
    """Return the peak MB above the existing arrays of one forward + backward pass."""
    weights = []
    for _ in range(layers):
        for shape in ((INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
            weights.append(mx.quantize(mx.random.normal(shape), group_size=GROUP_SIZE,
                                       bits=bits))
    x = mx.random.normal((8, 256, HIDDEN))
    mx.eval(weights, x)
    product = dequantized_product(GROUP_SIZE, bits, True)

    def layer(x, weight, scales, biases):
        if kind == "mlxlora product":
            return product(x, weight, scales, biases)
        if kind == "autodiff through dequantize":
            matrix = mx.dequantize(weight, scales, biases, group_size=GROUP_SIZE, bits=bits)
            return x @ matrix.T
        return mx.quantized_matmul(x, weight, scales, biases, transpose=True,
                                   group_size=GROUP_SIZE, bits=bits)

    def forward(x):
        for quantized in weights:
            x = mx.sin(layer(x, *quantized) / layers)
        return x.sum()

    gradient = mx.compile(mx.grad(forward)) if compiled else mx.grad(forward)
    mx.eval(gradient(x))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(gradient(x))
    return (mx.get_peak_memory() - before) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="Rows of x in part 1.")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    args = parser.parse_args()

    print(f"mlx {mx.__version__}, device {mx.default_device()}")
    time_products(args.rows, args.bits)

    float_mb = 30 * 2 * HIDDEN * INTERMEDIATE * 4 / 1e6
    print(f"\n30-layer stack, batch 8 x 256; its float32 weights would take {float_mb:.0f} MB")
    for compiled in (False, True):
        for kind in ("mlxlora product", "autodiff through dequantize", "quantized_matmul"):
            peak = stack_peak(kind, args.bits, compiled)
            mode = "compiled" if compiled else "eager"
            print(f"{kind:30s} {mode:8s} peak {peak:7.0f} MB above existing arrays")


if __name__ == "__main__":
    main()

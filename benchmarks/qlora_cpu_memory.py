"""Peak memory and time of a training step on a CPU: float32 base against 4-bit base.

    python benchmarks/qlora_cpu_memory.py [--hidden 2048] [--layers 16] [--batch 4] [--length 256]

Builds a randomly initialised llama of the given size: mlx-lm's llama, vocabulary 32,000,
SwiGLU width 2.75 x hidden. It attaches LoRA (r 8) to every linear layer and runs mlxlora's
compiled training step with Adam on random tokens. The float32 variant keeps float32
weights. The q4 variant quantizes them to 4 bits in groups of 64 and uses the dequantized
products of `mlxlora train --no-dequantize` on a CPU. Each variant runs in a fresh process. Random
weights have the same shapes as trained ones, so they take the same memory and time.
"""

import argparse
import json
import subprocess
import sys
import time

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.models import llama

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.dequantized_matmul import use_dequantized_matmul
from mlxlora.lean_mlp import enable_lean_swiglu
from mlxlora.session import configure_device
from mlxlora.step import TrainStep

VOCAB_SIZE = 32000
STEPS = 2


def build_model(hidden: int, layers: int) -> nn.Module:
    args = llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=int(2.75 * hidden), num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 256, rms_norm_eps=1e-5,
                           vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    return llama.Model(args)


def run_variant(variant: str, settings: dict) -> dict:
    """Train STEPS steps with one variant in this process; return its time and peak."""
    configure_device()
    mx.random.seed(0)
    model = build_model(settings["hidden"], settings["layers"])
    if variant == "q4":
        nn.quantize(model, group_size=64, bits=4)
        use_dequantized_matmul(model)
    model.freeze()
    attach_lora(model, resolve_targets(model, ["all-linear"]), 8, 16.0)
    enable_lean_swiglu(model, settings["hidden"], mx.float32)
    model.train()
    mx.eval(model.parameters())
    weights = sum(value.nbytes for _, value in nn.utils.tree_flatten(model.parameters()))

    batch, length = settings["batch"], settings["length"]
    tokens = mx.random.randint(0, VOCAB_SIZE, (batch, length + 1))
    arrays = (tokens[:, :-1], tokens[:, 1:], mx.ones((batch, length)))
    step = TrainStep(model, optim.Adam(learning_rate=1e-4), None)

    mx.reset_peak_memory()
    seconds = []
    for _ in range(STEPS):
        started = time.perf_counter()
        loss, norm = step([arrays], float(batch * length))
        mx.eval(loss, norm, model.state, step.optimizer.state)
        seconds.append(time.perf_counter() - started)
    return {"variant": variant, "weights_gb": weights / 1e9, "seconds": seconds,
            "peak_gb": mx.get_peak_memory() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SETTINGS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_variant(args.child[0], json.loads(args.child[1]))))
        return

    settings = {"hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                "length": args.length}
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {settings}, {STEPS} steps")
    for variant in ("float32", "q4"):
        child = subprocess.run([sys.executable, __file__, "--child", variant,
                                json.dumps(settings)], capture_output=True, text=True,
                               check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        steps = ", ".join(f"{s:.1f} s" for s in result["seconds"])
        print(f"{variant:8s} weights {result['weights_gb']:.2f} GB, peak "
              f"{result['peak_gb']:.2f} GB, steps {steps}")


if __name__ == "__main__":
    main()

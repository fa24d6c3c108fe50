"""Peak memory and time of mlxlora's training step on the widest batches of a data set.

    python benchmarks/step_memory.py MODEL_FOLDER TRAIN_JSONL [--batch-size 8] \
        [--max-seq-length 256] [--steps 3] [--mlx-lm-swiglu] [--quantized] [--no-compile]

The model gets LoRA on every linear layer (r 8, lora_alpha 16) and the compiled step of
`mlxlora train` with Adam. The batches are mlxlora's length-sorted batches, widest first.
Each line gives the batch shape, the step time (the first includes compilation) and the
peak MLX memory of that step. `--mlx-lm-swiglu` keeps mlx-lm's own SwiGLU activation
instead of mlxlora.lean_mlp, to measure what the lean one saves. `--quantized` keeps a
quantized model's weights quantized, with the dequantized products that `mlxlora train
--no-dequantize` uses on a CPU (mlxlora.dequantized_matmul). `--no-compile` runs the step
without mx.compile.
"""

import argparse
import time
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.config import TrainConfig
from mlxlora.data_formats import read_examples
from mlxlora.dequantized_matmul import use_dequantized_matmul
from mlxlora.lean_mlp import enable_lean_swiglu
from mlxlora.loading import load_model
from mlxlora.prompt import encode_split
from mlxlora.session import configure_device
from mlxlora.step import TrainStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model folder, Hub id or .gguf file.")
    parser.add_argument("train", type=Path, help="train.jsonl in a format mlxlora reads.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="Batches to run, widest first.")
    parser.add_argument("--mlx-lm-swiglu", action="store_true",
                        help="Keep mlx-lm's SwiGLU activation instead of the lean one.")
    parser.add_argument("--quantized", action="store_true",
                        help="Keep a quantized model quantized (QLoRA) instead of float32.")
    parser.add_argument("--no-compile", action="store_true",
                        help="Run the training step without mx.compile.")
    args = parser.parse_args()

    configure_device()
    loaded = load_model(args.model, dtype="float32", dequantize=not args.quantized)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.quantized:
        print(f"dequantized products in {use_dequantized_matmul(model)} quantized layers")
    attach_lora(model, resolve_targets(model, ["all-linear"]), 8, 16.0)
    if not args.mlx_lm_swiglu:
        changed = enable_lean_swiglu(model, loaded.config.get("hidden_size"), mx.float32)
        print(f"lean SwiGLU in {changed} MLPs")
    model.train()
    mx.eval(model.parameters())

    config = TrainConfig(max_seq_length=args.max_seq_length)
    examples = read_examples(args.train, config.prompt_key, config.completion_key)
    encoded = encode_split(examples, tokenizer, config).examples
    batches = batch_indices([len(e.tokens) for e in encoded], args.batch_size, 0, 0)
    batches.sort(key=lambda batch: -max(len(encoded[i].tokens) for i in batch))

    step = TrainStep(model, optim.Adam(learning_rate=1e-4), None, compile=not args.no_compile)
    pad_id = pad_token_id(tokenizer)
    for indices in batches[:args.steps]:
        batch = collate([encoded[i] for i in indices], pad_id)
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        mx.reset_peak_memory()
        started = time.perf_counter()
        loss, norm = step([arrays], float(batch.num_targets))
        mx.eval(loss, norm, model.state, step.optimizer.state)
        print(f"batch {batch.inputs.shape[0]} x {batch.inputs.shape[1]}, {batch.num_targets} "
              f"targets: loss {loss.item():.4f}, {time.perf_counter() - started:.2f} s, "
              f"peak {mx.get_peak_memory() / 1e9:.2f} GB", flush=True)


if __name__ == "__main__":
    main()

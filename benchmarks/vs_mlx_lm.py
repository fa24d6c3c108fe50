"""Compare mlxlora with mlx_lm.lora: same model, data, settings, BLAS and Python environment.

    python benchmarks/vs_mlx_lm.py --data PATH/TO/wwdc25 [--repeats 3] [--variants float32,q4]

Each repetition trains once with each tool, alternating which goes first, in fresh
processes (benchmarks/run_tool.py). The training rows are a whole number of batches and the
run is exactly one epoch, so both tools process the same examples; useful tokens/s therefore
divides one shared token count by each tool's loop time. The table reports medians over the
repetitions and the ratios mlxlora / mlx_lm. See benchmarks/README.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_lm.utils import load_tokenizer

from flops import ModelShape, workload_flops
from mlxlora.config import TrainConfig
from mlxlora.data_formats import read_examples
from mlxlora.prompt import encode_split
from prepare import VARIANTS, export_model, write_data

HERE = Path(__file__).resolve().parent
TOOLS = ("mlx_lm", "mlxlora", "mlxlora-checkpoint")
BASELINE = "mlx_lm"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="Folder with train.jsonl and valid.jsonl in completions format.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlxlora-vs-mlx-lm"),
                        help="Folder for the exported models, data, adapters and results.")
    parser.add_argument("--variants", default="float32,q4",
                        help="Comma-separated model variants: float32, q4.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per tool and variant.")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="Comma-separated: mlx_lm, mlxlora, mlxlora-checkpoint (mlxlora "
                             "with gradient checkpointing). mlx_lm is always run.")
    parser.add_argument("--train-rows", type=int, default=256,
                        help="Training rows (one epoch) for the float32 model.")
    parser.add_argument("--q4-train-rows", type=int, default=128,
                        help="Training rows (one epoch) for the 4-bit model.")
    parser.add_argument("--valid-rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0,
                        help="LoRA scale (mlx-lm's scale; mlxlora gets lora_alpha = scale * rank).")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the first repetition; repetition i uses seed + i for "
                             "both tools (LoRA initialisation and data order).")
    return parser.parse_args(argv)


def workload(model_folder: Path, train_folder: Path, max_seq_length: int, rank: int) -> dict:
    """Return the shared token counts and model FLOPs of one epoch over the training rows."""
    tokenizer = load_tokenizer(model_folder)
    config = TrainConfig(max_seq_length=max_seq_length)
    examples = read_examples(train_folder / "train.jsonl", config.prompt_key,
                             config.completion_key)
    encoded = encode_split(examples, tokenizer, config).examples
    sequences = [(len(e.tokens) - 1, e.num_targets) for e in encoded]

    model_config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    flops = workload_flops(ModelShape.from_config(model_config), sequences, rank)
    return {"examples": len(encoded), "useful_tokens": sum(t for _, t in sequences),
            "nonpad_tokens": sum(n for n, _ in sequences), "flops": flops}


def run_once(tool: str, settings: dict, work: Path, label: str) -> dict:
    """Run one tool in a fresh process; return its result with the load average around it."""
    settings_path = work / f"{label}.settings.json"
    result_path = work / f"{label}.result.json"
    log_path = work / f"{label}.log"
    settings_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    result_path.unlink(missing_ok=True)

    before = os.getloadavg()[0]
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(
            [sys.executable, str(HERE / "run_tool.py"), tool, str(settings_path),
             str(result_path)], stdout=log, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{tool} run {label} failed with exit code {completed.returncode}; "
                           f"see {log_path}")

    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["load_before"] = before
    return result


def variant_settings(args, variant: str, work: Path) -> tuple[dict, dict]:
    rows = args.train_rows if variant == "float32" else args.q4_train_rows
    if rows % args.batch_size:
        raise SystemExit(f"--train-rows/--q4-train-rows ({rows}) must be a multiple of "
                         f"--batch-size ({args.batch_size}), so both tools see every row once")

    model = export_model(work / f"smollm2-{variant}", variant)
    train_folder, valid_path = write_data(args.data, work / f"data-{rows}", rows,
                                          args.valid_rows)
    settings = {"variant": variant, "model": str(model), "data": str(train_folder),
                "valid": str(valid_path), "batch_size": args.batch_size,
                "steps": rows // args.batch_size, "max_seq_length": args.max_seq_length,
                "rank": args.rank, "scale": args.scale, "learning_rate": args.learning_rate,
                "seed": args.seed}
    return settings, workload(model, train_folder, args.max_seq_length, args.rank)


def summarize(results: list[dict], shared: dict) -> dict:
    """Return the median of each measurement over one tool's repetitions."""
    def median(values):
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else float("nan")

    loops = [r["loop_seconds"] for r in results]
    cpu = [r["loop_cpu_seconds"] for r in results]
    mfu = [shared["flops"]["total"] / r["loop_seconds"] / r["matmul_peak_flops"]
           for r in results]
    return {
        "runs": len(results),
        "loop_seconds": median(loops),
        "loop_cpu_seconds": median(cpu),
        "useful_tokens_per_cpu_second": median([shared["useful_tokens"] / t for t in cpu]),
        "useful_tokens_per_second": median([shared["useful_tokens"] / t for t in loops]),
        "nonpad_tokens_per_second": median([shared["nonpad_tokens"] / t for t in loops]),
        "median_step_seconds": median([r["median_step_seconds"] for r in results]),
        "first_step_seconds": median([r["first_step_seconds"] for r in results]),
        "peak_memory_gb": median([r["peak_memory_bytes"] for r in results]) / 1e9,
        "max_rss_gb": median([r["max_rss_bytes"] for r in results]) / 1e9,
        "val_loss": median([r["val_loss"] for r in results]),
        "model_gflops_per_second": median([shared["flops"]["total"] / t / 1e9 for t in loops]),
        "matmul_peak_flops": median([r["matmul_peak_flops"] for r in results]),
        "mfu": median(mfu),
        "own_loss_tokens": median([r["own_loss_tokens"] for r in results]),
        "own_nonpad_tokens": median([r["own_nonpad_tokens"] for r in results]),
        "load_average": [min(r["load_before"] for r in results),
                         max(r["load_average"][0] for r in results)],
    }


ROWS = [
    ("useful tokens/s (loss tokens)", "useful_tokens_per_second", "{:,.0f}"),
    ("non-pad tokens/s", "nonpad_tokens_per_second", "{:,.0f}"),
    ("training loop wall time (s)", "loop_seconds", "{:.1f}"),
    ("training loop CPU time, all threads (s)", "loop_cpu_seconds", "{:.1f}"),
    ("useful tokens per CPU second", "useful_tokens_per_cpu_second", "{:,.1f}"),
    ("median step time (s)", "median_step_seconds", "{:.2f}"),
    ("first step, with compilation (s)", "first_step_seconds", "{:.2f}"),
    ("peak MLX memory (GB)", "peak_memory_gb", "{:.2f}"),
    ("max RSS (GB)", "max_rss_gb", "{:.2f}"),
    ("validation loss after training", "val_loss", "{:.4f}"),
    ("model GFLOP/s", "model_gflops_per_second", "{:.3g}"),
    ("MFU (of measured fp32 matmul peak)", "mfu", "{:.1%}"),
]


def markdown_table(variant: str, summary: dict, shared: dict) -> str:
    """Return a markdown table: mlx_lm, then each mlxlora configuration and its ratio."""
    others = [tool for tool in summary if tool != BASELINE]
    header = "| | mlx_lm.lora | " + " | ".join(f"{tool} | {tool} / mlx_lm" for tool in others)
    lines = [f"### {variant}: {shared['examples']} examples, {shared['useful_tokens']:,} loss "
             f"tokens, {shared['nonpad_tokens']:,} non-pad tokens, "
             f"{shared['flops']['total'] / 1e12:.2f} TFLOP per epoch",
             "", header + " |", "|---|---:|" + "---:|---:|" * len(others)]

    baseline = summary[BASELINE]
    for label, key, style in ROWS:
        cells = [label, style.format(baseline[key])]
        for tool in others:
            value = summary[tool][key]
            ratio = value / baseline[key] if baseline[key] else float("nan")
            cells += [style.format(value), f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")

    peaks = [summary[tool]["matmul_peak_flops"] for tool in summary]
    loads = [summary[tool]["load_average"] for tool in summary]
    lines.append("")
    lines.append(f"Measured fp32 matmul peak (2048^3, best of 8, median over runs): "
                 f"{statistics.median(peaks) / 1e9:.0f} GFLOP/s. Load average (1 min) from "
                 f"{min(low for low, _ in loads):.1f} to {max(high for _, high in loads):.1f}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}")

    tools = [BASELINE] + [t.strip() for t in args.tools.split(",") if t.strip() not in ("", BASELINE)]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise SystemExit(f"--tools: unknown {', '.join(unknown)}; use {', '.join(TOOLS)}")

    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "variants": {}}
    for variant in variants:
        settings, shared = variant_settings(args, variant, work)
        results = {tool: [] for tool in tools}
        for repeat in range(args.repeats):
            order = tools if repeat % 2 == 0 else tools[::-1]
            for tool in order:
                label = f"{variant}-{tool}-{repeat}"
                settings["adapter_path"] = str(work / "adapters" / label)
                settings["seed"] = args.seed + repeat
                results[tool].append(run_once(tool, settings, work, label))
                print(f"{label}: {results[tool][-1]['loop_seconds']:.1f} s", flush=True)

        summary = {tool: summarize(results[tool], shared) for tool in tools}
        report["variants"][variant] = {"settings": settings, "shared": shared,
                                       "summary": summary, "runs": results}
        print(markdown_table(variant, summary, shared), flush=True)

    report["load_average_end"] = os.getloadavg()
    (work / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()

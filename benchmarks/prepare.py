"""Inputs shared by both tools in the mlx_lm.lora comparison: model folders and data.

mlx_lm.lora reads only MLX/Hugging Face model folders, so the SmolLM2 GGUF is loaded with
mlxlora's loader and written once as a float32 folder and once as a 4-bit folder (the GGUF's
own Q4_1 blocks as MLX affine quantization). Both tools then load the same folder.
"""

import json
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_lm.utils import save_config, save_model

from mlxlora.config import DEFAULT_MODEL
from mlxlora.loading import load_model

VARIANTS = ("float32", "q4")


def export_model(folder: Path, variant: str) -> Path:
    """Write the default SmolLM2 model as an MLX folder, unless the folder already exists."""
    if (folder / "config.json").is_file():
        return folder
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; use one of {', '.join(VARIANTS)}")

    loaded = load_model(DEFAULT_MODEL, dtype="float32", dequantize=variant == "float32")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, loaded.model)
    save_config(dict(loaded.config), folder / "config.json")
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


def read_rows(path: Path, count: int) -> list[str]:
    """Return the first ``count`` non-empty lines of a JSONL file; raise if it has fewer."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < count:
        raise ValueError(f"{path} has {len(lines)} rows, fewer than the {count} requested")
    for number, line in enumerate(lines[:count], start=1):
        json.loads(line)  # fail here, with the line number, rather than inside a tool
    return lines[:count]


def write_data(source: Path, folder: Path, train_rows: int, valid_rows: int) -> tuple[Path, Path]:
    """Write train/train.jsonl (what both tools train on) and valid.jsonl (for evaluation).

    The training folder has no valid.jsonl, so neither tool spends time on validation
    inside the timed loop; the final validation loss is computed afterwards by one shared
    evaluator.
    """
    train_folder = folder / "train"
    train_folder.mkdir(parents=True, exist_ok=True)
    train = read_rows(source / "train.jsonl", train_rows)
    (train_folder / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")

    valid_path = folder / "valid.jsonl"
    valid = read_rows(source / "valid.jsonl", valid_rows)
    valid_path.write_text("\n".join(valid) + "\n", encoding="utf-8")
    return train_folder, valid_path

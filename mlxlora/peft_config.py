"""Read a Hugging Face PEFT adapter_config.json and check that mlxlora can load the adapter.

mlxlora's LoRALinear computes base(x) + scaling * x @ A.T @ B.T with one r and one lora_alpha
for every module. A PEFT LoRA adapter loads when it computes the same. Variants that add
parameters, change the base weights or route inputs are rejected, and the error names the
field that enables them. Field names and meanings follow peft 0.21's LoraConfig.
"""

import json
import logging
import numbers
import re
from pathlib import Path

from mlxlora.errors import AdapterError

logger = logging.getLogger("mlxlora")

CONFIG_FILE = "adapter_config.json"

MERGE_HINT = ("merge the adapter into its base model in PEFT (merge_and_unload) and load the "
              "merged model instead")

# Fields that enable something LoRALinear does not compute, and what that is.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module lora_alpha values",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on parameters instead of modules",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "Monte Carlo LoRA",
    "arrow_config": "Arrow routing",
}

# init_lora_weights values (or their prefixes) that also rewrite the base weights during
# PEFT training, so the saved A and B only work on that rewritten base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Fields read elsewhere, or that only matter while PEFT trains or places the adapter.
KNOWN_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias",
    "fan_in_fan_out", "init_lora_weights", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "velora_config", "qalora_group_size",
    "ensure_weight_tying",
}


def read_json_object(path: Path) -> dict | None:
    """Return the JSON object in ``path``, or None when it is missing or not a JSON object."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def is_peft_folder(folder: Path) -> bool:
    """Return whether ``folder`` has a PEFT adapter config: adapter_config.json with peft_type."""
    content = read_json_object(Path(folder) / CONFIG_FILE)
    return content is not None and "peft_type" in content


def read_peft_config(folder: Path) -> dict:
    """Read the PEFT adapter_config.json in ``folder``; raise AdapterError naming every problem."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} not found; pass a folder saved by PEFT's "
                           "save_pretrained") from None
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(config).__name__}")

    problems = check_peft_config(config, path)
    if problems:
        raise AdapterError(problems, header=f"{path}: the PEFT adapter cannot be loaded:")
    warn_unknown_fields(config, path)
    return config


def check_peft_config(config: dict, path: Path) -> list[str]:
    """Return one message per field that stops mlxlora from loading this adapter."""
    if config.get("peft_type") != "LORA":
        return [f"{path}: peft_type is {config.get('peft_type')!r}; mlxlora loads only LoRA "
                "adapters (peft_type \"LORA\")"]

    problems = check_numbers(config, path)
    problems += check_targets(config, path)
    for field, feature in UNSUPPORTED_FEATURES.items():
        value = config.get(field)
        if value:
            problems.append(f"{path}: {field} is {value!r}, so the adapter uses {feature}, which "
                            f"mlxlora cannot load; {MERGE_HINT}")

    if config.get("bias", "none") != "none":
        problems.append(f"{path}: bias is {config['bias']!r}, so the adapter changes the base "
                        f"model's biases, which mlxlora cannot load; {MERGE_HINT}")

    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        problems.append(
            f"{path}: init_lora_weights is {init!r}, which also rewrote the base weights when "
            "PEFT training started, so this adapter only works on that rewritten base. Convert it "
            "to plain LoRA in PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) and load that folder.")
    return problems


def check_numbers(config: dict, path: Path) -> list[str]:
    problems = []
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"{path}: r is {r!r}; it must be a positive integer")

    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        problems.append(f"{path}: lora_alpha is {alpha!r}; it must be a number")

    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        problems.append(f"{path}: lora_dropout is {dropout!r}; it must be a number in [0, 1)")

    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"{path}: use_rslora is {config['use_rslora']!r}; it must be true or false")
    return problems


def check_targets(config: dict, path: Path) -> list[str]:
    """Check target_modules and exclude_modules: a regex string or a list of names each."""
    problems = []
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value is None and field == "exclude_modules":
            continue
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                problems.append(f"{path}: {field} {value!r} is an invalid regex: {error}")
        elif not (isinstance(value, list) and all(isinstance(entry, str) for entry in value)):
            problems.append(f"{path}: {field} is {value!r}; it must be a regex string or a list "
                            "of module names")

    indexes = config.get("layers_to_transform")
    if indexes is not None and not (is_index(indexes) or (
            isinstance(indexes, list) and all(is_index(index) for index in indexes))):
        problems.append(f"{path}: layers_to_transform is {indexes!r}; it must be a block index "
                        "or a list of them")
    return problems


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def warn_unknown_fields(config: dict, path: Path) -> None:
    """Log fields this version does not know, because a newer PEFT feature may hide in them."""
    unknown = sorted(field for field, value in config.items()
                     if field not in KNOWN_FIELDS and field not in UNSUPPORTED_FEATURES
                     and value not in (None, False, [], {}))
    if unknown:
        logger.warning("%s: ignoring PEFT config fields mlxlora does not know: %s. If the adapter "
                       "behaves differently in PEFT, one of them is the likely cause.",
                       path, ", ".join(unknown))

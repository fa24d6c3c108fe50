"""Find the layers to adapt, wrap them in LoRALinear, and freeze everything else."""

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.errors import ModelError
from mlxlora.lora import LoRALinear

PRESETS = ("attention", "mlp", "all-linear")

# Leaf names of MoE routers. A router's few outputs choose experts; adapting it is rarely
# wanted and changes which experts run, so all-linear leaves routers out.
ROUTER_NAMES = ("gate", "router")

REGEX_CHARACTERS = set("*+?[](){}|^$\\")

BLOCK_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Candidate:
    path: str
    module: nn.Module
    block: int | None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def is_switch_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("SwitchLinear", "QuantizedSwitchLinear")


def list_candidates(model: nn.Module) -> list[Candidate]:
    """Return every linear-like module with its dotted path and transformer block index."""
    candidates = []
    for path, module in model.named_modules():
        if is_linear(module) or is_switch_linear(module) or isinstance(module, nn.Embedding):
            match = BLOCK_PATTERN.search(path)
            block = int(match.group(1)) if match else None
            candidates.append(Candidate(path, module, block))
    return candidates


def count_blocks(model: nn.Module) -> int:
    return len(model.layers)


def in_preset(candidate: Candidate, preset: str) -> bool:
    """Return whether a module inside a transformer block belongs to a preset."""
    if candidate.block is None or not is_linear(candidate.module):
        return False

    parts = candidate.path.split(".")
    if parts[-1] in ROUTER_NAMES:
        return False
    if preset == "all-linear":
        return True
    if preset == "attention":
        return any("attn" in part or "attention" in part for part in parts)
    return any(part in ("mlp", "feed_forward", "ffn") for part in parts)


def matches(candidate: Candidate, entry: str) -> bool:
    if entry in PRESETS:
        return in_preset(candidate, entry)
    if REGEX_CHARACTERS & set(entry):
        return re.fullmatch(entry, candidate.path) is not None
    return candidate.path == entry or candidate.path.endswith("." + entry)


def module_names(candidates: list[Candidate]) -> list[str]:
    """Return the distinct names a user can write, such as q_proj and self_attn.q_proj."""
    names = set()
    for candidate in candidates:
        parts = candidate.path.split(".")
        names.add(parts[-1])
        if candidate.block is not None:
            names.add(".".join(parts[-2:]))
        else:
            names.add(candidate.path)
    return sorted(names)


def resolve_targets(model: nn.Module, target_modules: list[str],
                    layers: int | None = None) -> list[str]:
    """Return the sorted dotted paths of the modules to adapt.

    ``layers`` keeps only the last N transformer blocks. Raises ModelError naming entries that
    match nothing (with the model's module names), and modules that cannot take LoRA.
    """
    candidates = list_candidates(model)
    total_blocks = count_blocks(model)
    first_block = 0 if layers is None else max(0, total_blocks - layers)

    selected = {}
    problems = []
    for entry in target_modules:
        hits = [c for c in candidates if matches(c, entry)]
        hits = [c for c in hits if c.block is None or c.block >= first_block]
        if not hits:
            problems.append(
                f"target_modules entry '{entry}' matches no module in the model. "
                f"Presets: {', '.join(PRESETS)}. Module names: {', '.join(module_names(candidates))}"
            )
        for candidate in hits:
            selected[candidate.path] = candidate

    for candidate in selected.values():
        if isinstance(candidate.module, nn.Embedding):
            problems.append(f"{candidate.path}: LoRA on embeddings is not supported; "
                            "remove it from target_modules")
        elif is_switch_linear(candidate.module):
            problems.append(f"{candidate.path}: LoRA on mixture-of-experts layers "
                            f"({type(candidate.module).__name__}) is not supported yet; "
                            "target the attention layers instead")

    if problems:
        raise ModelError(problems)
    return sorted(selected, key=natural_key)


def natural_key(path: str) -> list:
    """Sort key that orders layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def attach_lora(model: nn.Module, paths: list[str], r: int, lora_alpha: float,
                lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
    """Replace each named linear layer with a LoRALinear and freeze all but the adapters."""
    modules = dict(model.named_modules())
    replacements = []
    for path in paths:
        base = modules[path]
        if isinstance(base, LoRALinear):
            raise ModelError(f"{path} already has a LoRA adapter")
        replacements.append((path, LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora)))

    model.update_modules(unflatten_paths(replacements))
    freeze_all_but_lora(model)


def unflatten_paths(items: list[tuple[str, nn.Module]]) -> dict:
    """Turn [("a.0.b", m)] into the nested dict/list structure Module.update_modules takes."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


def freeze_all_but_lora(model: nn.Module) -> None:
    model.freeze()
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(keys=["lora_A", "lora_B"], recurse=False)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Return (total, trainable) parameter counts.

    Quantized weights count as their unpacked values; their scales and biases are storage,
    not parameters, and are left out.
    """
    quantized = {path: m for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}

    total = 0
    for path, value in tree_flatten(model.parameters()):
        owner, _, name = path.rpartition(".")
        module = quantized.get(owner)
        if module is None:
            total += value.size
        elif name == "weight":
            total += value.size * 32 // module.bits
        elif name == "bias":
            total += value.size

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return total, trainable

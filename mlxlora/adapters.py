"""The adapter folder: adapter_config.json plus adapters.safetensors.

adapter_config.json holds everything needed to rebuild the adapter on its base model:
the base model reference and fingerprint, r, lora_alpha, lora_dropout, use_rslora, the
resolved list of adapted module paths, and the block limit.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, lora_layers
from mlxlora.errors import AdapterError
from mlxlora.files import atomic_write_json, atomic_save_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
FORMAT_VERSION = 1


@dataclass
class AdapterSpec:
    """The contents of adapter_config.json."""

    base_model: str
    base_fingerprint: str
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    target_modules: list[str]
    layers: int | None
    format: str = "mlxlora"
    format_version: int = FORMAT_VERSION


SPEC_FIELDS = {f.name for f in fields(AdapterSpec)}
REQUIRED_FIELDS = {f.name for f in fields(AdapterSpec) if f.name not in ("format", "format_version")}


def base_fingerprint(model: nn.Module) -> str:
    """Return a short hash of the base model's parameter names, shapes and norm weights.

    Shapes alone cannot tell a base model from its fine-tune, so the hash also covers the
    values of the normalisation weights, which are small and almost always differ between
    checkpoints. LoRA parameters are left out.
    """
    digest = hashlib.sha256()
    for path, value in sorted(tree_flatten(model.parameters())):
        if ".lora_" in path:
            continue
        stored_path = path.replace(".base.", ".")
        digest.update(f"{stored_path}:{tuple(value.shape)}:{value.dtype};".encode())
        if "norm" in stored_path:
            digest.update(bytes(memoryview(value.astype(mx.float32))))
    return digest.hexdigest()[:16]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Return the LoRA parameters keyed by dotted path, e.g. model.layers.0.self_attn.q_proj.lora_A."""
    weights = {}
    for path, layer in lora_layers(model).items():
        weights[f"{path}.lora_A"] = layer.lora_A
        weights[f"{path}.lora_B"] = layer.lora_B
    return weights


def save_adapter(folder: Path, model: nn.Module, spec: AdapterSpec,
                 weights_file: str = WEIGHTS_FILE) -> None:
    """Write the adapter weights and config atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / weights_file, adapter_weights(model),
                            metadata={"format": "mlx"})
    atomic_write_json(folder / CONFIG_FILE, asdict(spec))


def read_adapter_spec(folder: Path) -> AdapterSpec:
    """Read and validate adapter_config.json; raise AdapterError naming every problem."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise AdapterError(f"adapter folder {folder} not found; pass the --adapter-path of a "
                           "finished mlxlora train run")
    if not path.is_file():
        raise AdapterError(f"{path} not found; is {folder} an adapter folder from mlxlora train?")

    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None

    problems = []
    unknown = sorted(set(content) - SPEC_FIELDS)
    missing = sorted(REQUIRED_FIELDS - set(content))
    if unknown:
        problems.append(f"{path}: unknown fields {', '.join(unknown)}")
    if missing:
        problems.append(f"{path}: missing fields {', '.join(missing)}")
    if problems:
        raise AdapterError(problems)
    return AdapterSpec(**content)


def check_base(spec: AdapterSpec, model: nn.Module, folder: Path) -> None:
    fingerprint = base_fingerprint(model)
    if fingerprint != spec.base_fingerprint:
        raise AdapterError(
            f"{folder} was trained on base model {spec.base_model} (fingerprint "
            f"{spec.base_fingerprint}), but the loaded model has fingerprint {fingerprint}. "
            f"Pass --model {spec.base_model}, the model the adapter was trained on."
        )


def load_adapter(model: nn.Module, folder: Path, weights_file: str = WEIGHTS_FILE,
                 check_fingerprint: bool = True) -> AdapterSpec:
    """Attach the adapter in ``folder`` to ``model`` and load its weights.

    Raises AdapterError when the adapter was made for another base model (fingerprint or
    shape mismatch) or its files are incomplete.
    """
    folder = Path(folder)
    spec = read_adapter_spec(folder)
    if check_fingerprint:
        check_base(spec, model, folder)

    modules = dict(model.named_modules())
    missing = [p for p in spec.target_modules if p not in modules]
    if missing:
        raise AdapterError(f"{folder}: the model has no module {missing[0]} "
                           f"({len(missing)} adapted modules missing); the adapter was made "
                           f"for {spec.base_model}")

    attach_lora(model, spec.target_modules, spec.r, spec.lora_alpha, spec.lora_dropout,
                spec.use_rslora)
    load_adapter_weights(model, folder / weights_file)
    return spec


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load LoRA weights into already attached LoRA layers, checking names and shapes."""
    if not path.is_file():
        raise AdapterError(f"{path} not found")

    weights = mx.load(str(path))
    expected = adapter_weights(model)
    problems = []
    for name, value in expected.items():
        stored = weights.get(name)
        if stored is None:
            problems.append(f"{path}: tensor {name} is missing")
        elif stored.shape != value.shape:
            problems.append(f"{path}: tensor {name} has shape {tuple(stored.shape)}, the model "
                            f"needs {tuple(value.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        problems.append(f"{path}: unexpected tensors {', '.join(extra[:5])}")
    if problems:
        raise AdapterError(problems)

    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())

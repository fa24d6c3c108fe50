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
from mlxlora.dequantized_matmul import dequantized_weight
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
    base_signature: list[float]
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


def logical_parameters(model: nn.Module):
    """Yield (path, shape, module) for base parameters as an unquantized float model has them.

    LoRA parameters and quantization scales and biases are skipped; a quantized weight
    reports its unpacked shape, so the same model loaded quantized or dequantized, in any
    dtype, yields the same list.
    """
    modules = dict(model.named_modules())
    for path, value in sorted(tree_flatten(model.parameters())):
        owner_path, _, name = path.rpartition(".")
        owner = modules.get(owner_path)
        if ".lora_" in path or "." + name in (".lora_A", ".lora_B"):
            continue
        logical_path = path.replace(".base.", ".")
        shape = tuple(value.shape)
        if isinstance(owner, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            if name in ("scales", "biases"):
                continue
            if name == "weight":
                shape = shape[:-1] + (shape[-1] * 32 // owner.bits,)
        yield logical_path, shape, owner


def base_fingerprint(model: nn.Module) -> str:
    """Return a short hash of the base model's parameter names and unpacked shapes."""
    digest = hashlib.sha256()
    for path, shape, _ in logical_parameters(model):
        digest.update(f"{path}:{shape};".encode())
    return digest.hexdigest()[:16]


def base_signature(model: nn.Module) -> list[float]:
    """Return summary values of the base weights that tell checkpoints of one architecture apart.

    Shapes cannot tell a base model from its fine-tune, so this adds the mean of every
    normalisation weight and the mean absolute value of the token embeddings. Means survive
    casting and quantization to within about 1%, so compare with a tolerance.
    """
    values = []
    for path, _, owner in logical_parameters(model):
        if path.endswith("norm.weight"):
            values.append(float(owner.weight.astype(mx.float32).mean().item()))
        elif path.endswith("embed_tokens.weight"):
            values.append(float(mx.abs(embedding_matrix(owner)).mean().item()))
    return [round(v, 6) for v in values]


def embedding_matrix(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedEmbedding):
        return dequantized_weight(module).astype(mx.float32)
    return module.weight.astype(mx.float32)


def signatures_match(expected: list[float], actual: list[float], tolerance: float = 0.02) -> bool:
    if len(expected) != len(actual):
        return False
    return all(abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-3) for a, b in zip(expected, actual))


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

    # Imported here because peft_io builds on this module.
    from mlxlora import peft_io

    if peft_io.is_peft_folder(folder):
        return peft_io.read_peft_spec(folder)

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
    """Raise AdapterError unless ``model`` looks like the base the adapter was trained on."""
    fingerprint = base_fingerprint(model)
    if fingerprint != spec.base_fingerprint:
        reason = f"its parameter shapes differ (fingerprint {fingerprint}, expected {spec.base_fingerprint})"
    elif not signatures_match(spec.base_signature, base_signature(model)):
        reason = "its weights differ (same architecture, another checkpoint)"
    else:
        return
    raise AdapterError(
        f"{folder} was trained on base model {spec.base_model}, and the loaded model is not "
        f"that model: {reason}. Pass --model {spec.base_model}, the model the adapter was "
        "trained on.")


def load_adapter(model: nn.Module, folder: Path, weights_file: str = WEIGHTS_FILE,
                 check_fingerprint: bool = True) -> AdapterSpec:
    """Attach the adapter in ``folder`` to ``model`` and load its weights.

    Raises AdapterError when the adapter was made for another base model (fingerprint or
    shape mismatch) or its files are incomplete. A Hugging Face PEFT LoRA folder is converted
    by mlxlora.peft_io, which checks shapes only, because PEFT records no base fingerprint.
    """
    from mlxlora import peft_io

    folder = Path(folder)
    if peft_io.is_peft_folder(folder):
        return peft_io.load_peft_adapter(model, folder)

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

"""Read and write adapters in Hugging Face PEFT's layout.

A PEFT LoRA folder contains adapter_config.json (a LoraConfig with peft_type "LORA") and
adapter_model.safetensors with one pair of tensors per adapted module:
``base_model.model.<module path>.lora_A.weight`` of shape (r, in_features) and
``...lora_B.weight`` of shape (out_features, r). LoRALinear stores lora_A and lora_B in the
same layout, so conversion renames tensors and never transposes them.
"""

import logging
import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxlora.adapters import (WEIGHTS_FILE, AdapterSpec, base_fingerprint, base_signature,
                              read_adapter_spec, save_adapter)
from mlxlora.attach import attach_lora, count_blocks, natural_key
from mlxlora.errors import AdapterError
from mlxlora.files import atomic_save_safetensors, atomic_write_json
from mlxlora.lora import linear_shape
from mlxlora.peft_config import CONFIG_FILE, is_peft_folder, read_peft_config
from mlxlora.peft_targets import resolve_peft_targets, split_block_path, target_fields

logger = logging.getLogger("mlxlora")

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight$")
EXPORT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# A LoRA pair per module path: {"A": (r, in_features), "B": (out_features, r)}.
LoraPairs = dict[str, dict[str, mx.array]]


def peft_key(module_path: str, matrix: str) -> str:
    return f"base_model.model.{module_path}.lora_{matrix}.weight"


def load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error})") from None


def read_peft_tensors(folder: Path) -> LoraPairs:
    """Read adapter_model.safetensors into LoRA pairs; raise AdapterError on other tensors."""
    path = Path(folder) / PEFT_WEIGHTS_FILE
    if not path.is_file():
        hint = ""
        if (Path(folder) / "adapter_model.bin").is_file():
            hint = (" The folder contains adapter_model.bin, PEFT's older pickle format: load the "
                    "adapter in PEFT and save it again with save_pretrained(..., "
                    "safe_serialization=True).")
        raise AdapterError(f"{path} not found.{hint}")

    pairs: LoraPairs = {}
    unexpected = []
    for key, value in load_safetensors(path).items():
        match = KEY_PATTERN.match(key)
        if match is None:
            unexpected.append(key)
        else:
            pairs.setdefault(match["module"], {})[match["matrix"]] = value

    problems = []
    if unexpected:
        problems.append(
            f"{path}: unexpected tensors {', '.join(sorted(unexpected)[:4])} ({len(unexpected)} "
            "in all); mlxlora loads only base_model.model.<module>.lora_A.weight and "
            "lora_B.weight tensors of linear layers")
    for module, pair in sorted(pairs.items(), key=lambda item: natural_key(item[0])):
        for matrix in sorted({"A", "B"} - set(pair)):
            problems.append(f"{path}: tensor {peft_key(module, matrix)} is missing")
    if problems:
        raise AdapterError(problems)
    return pairs


def select_modules(config: dict, pairs: LoraPairs, model: nn.Module, folder: Path) -> list[str]:
    """Return the module paths to adapt: those the config selects, which must have tensors.

    Tensors the config does not select, and selected modules that cannot take LoRA, raise
    AdapterError. Selected modules without tensors are left out with a warning when PEFT
    would start them with lora_B at zero, which changes nothing.
    """
    config_path = folder / CONFIG_FILE
    weights_path = folder / PEFT_WEIGHTS_FILE
    selected, unsupported = resolve_peft_targets(config, model)
    modules = dict(model.named_modules())
    stored = sorted(pairs, key=natural_key)

    problems = []
    if unsupported:
        problems.append(f"{config_path}: target_modules selects {', '.join(unsupported[:3])}, "
                        "which are embeddings or mixture-of-experts layers; mlxlora attaches "
                        "LoRA only to linear layers")
    absent = [path for path in stored if path not in modules]
    if absent:
        problems.append(
            f"{weights_path}: the model has no module {absent[0]} ({len(absent)} of "
            f"{len(stored)} adapted modules missing). PEFT names tensors after the modules of "
            "the transformers model it wrapped: load the adapter on a model of the same "
            "architecture, saved from a ...ForCausalLM model (task_type CAUSAL_LM).")
    unselected = [path for path in stored if path in modules and path not in selected]
    if unselected:
        problems.append(
            f"{weights_path}: contains tensors for {', '.join(unselected[:3])} ({len(unselected)} "
            f"modules in all), which target_modules in {config_path.name} does not select, so "
            "PEFT would ignore them; fix target_modules, layers_to_transform or exclude_modules")

    without_tensors = [path for path in selected if path not in pairs]
    if without_tensors and config.get("init_lora_weights", True) is not True:
        problems.append(
            f"{weights_path}: has no tensors for {', '.join(without_tensors[:3])} "
            f"({len(without_tensors)} selected modules in all), and init_lora_weights is "
            f"{config.get('init_lora_weights')!r}, so PEFT would start them at random values")
    if len(without_tensors) == len(selected):
        problems.append(f"{config_path}: target_modules selects no module of the loaded model "
                        f"that has tensors in {weights_path.name}")
    if problems:
        raise AdapterError(problems)

    if without_tensors:
        logger.warning("%s: target_modules also selects %d modules without tensors (first: %s). "
                       "PEFT starts them with lora_B at zero, so they change nothing; mlxlora "
                       "leaves them out.", folder, len(without_tensors), without_tensors[0])
    return [path for path in selected if path in pairs]


def check_shapes(pairs: LoraPairs, paths: list[str], model: nn.Module, r: int,
                 folder: Path) -> None:
    """Raise AdapterError naming every tensor whose shape does not fit its module and r."""
    modules = dict(model.named_modules())
    problems = []
    for path in paths:
        out_features, in_features = linear_shape(modules[path])
        expected = {"A": (r, in_features), "B": (out_features, r)}
        for matrix, shape in expected.items():
            actual = tuple(pairs[path][matrix].shape)
            if actual != shape:
                problems.append(f"{folder / PEFT_WEIGHTS_FILE}: tensor {peft_key(path, matrix)} "
                                f"has shape {actual}; with r={r} the model needs {shape}")
    if problems:
        raise AdapterError(problems, header=f"{folder} does not fit the loaded model "
                                            "(wrong base model or wrong r):")


def inferred_layers(paths: list[str], model: nn.Module) -> int | None:
    """Return the block limit that ``paths`` imply: the blocks from the first adapted one."""
    blocks = [split_block_path(path) for path in paths]
    if not blocks or any(block is None for block in blocks):
        return None
    first = min(block for _, block, _ in blocks)
    return count_blocks(model) - first if first > 0 else None


def spec_from_peft(config: dict, paths: list[str], layers: int | None) -> AdapterSpec:
    """Return the AdapterSpec of a PEFT adapter; the base fingerprint fields stay empty."""
    return AdapterSpec(
        base_model=config.get("base_model_name_or_path") or "",
        base_fingerprint="",
        base_signature=[],
        r=config["r"],
        lora_alpha=float(config["lora_alpha"]),
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=paths,
        layers=layers,
        format="peft",
    )


def read_peft_spec(folder: Path) -> AdapterSpec:
    """Read a PEFT adapter folder without a model; target_modules lists the stored modules."""
    folder = Path(folder)
    config = read_peft_config(folder)
    paths = sorted(read_peft_tensors(folder), key=natural_key)
    return spec_from_peft(config, paths, layers=None)


def load_peft_adapter(model: nn.Module, folder: Path) -> AdapterSpec:
    """Attach the PEFT LoRA adapter in ``folder`` to ``model`` and load its weights.

    PEFT folders carry no fingerprint of their base model, so only tensor shapes are checked
    and a warning is logged. Tensors are cast to float32, the dtype LoRALinear trains in.
    """
    folder = Path(folder)
    config = read_peft_config(folder)
    pairs = read_peft_tensors(folder)
    paths = select_modules(config, pairs, model, folder)
    check_shapes(pairs, paths, model, config["r"], folder)

    spec = spec_from_peft(config, paths, inferred_layers(paths, model))
    base = spec.base_model or "the model it was trained on"
    logger.warning("%s is a PEFT adapter, which records no fingerprint of its base model, so "
                   "mlxlora checked only tensor shapes and could not verify that the loaded "
                   "model is %s.", folder, base)

    attach_lora(model, paths, spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora)
    weights = []
    for path in paths:
        weights.append((f"{path}.lora_A", pairs[path]["A"].astype(mx.float32)))
        weights.append((f"{path}.lora_B", pairs[path]["B"].astype(mx.float32)))
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    return spec


def read_lora_pairs(folder: Path, spec: AdapterSpec) -> LoraPairs:
    """Read an mlxlora adapters.safetensors, checking tensor names and shapes against ``spec``."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found; is {folder} a finished mlxlora adapter folder?")

    weights = load_safetensors(path)
    expected = {f"{module}.lora_{matrix}" for module in spec.target_modules for matrix in "AB"}
    problems = [f"{path}: tensor {name} is missing" for name in sorted(expected - set(weights))]
    extra = sorted(set(weights) - expected)
    if extra:
        problems.append(f"{path}: unexpected tensors {', '.join(extra[:4])}, not in "
                        f"target_modules of {CONFIG_FILE}")
    if problems:
        raise AdapterError(problems)

    pairs = {module: {"A": weights[f"{module}.lora_A"], "B": weights[f"{module}.lora_B"]}
             for module in spec.target_modules}
    for module, pair in pairs.items():
        a_shape, b_shape = tuple(pair["A"].shape), tuple(pair["B"].shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != spec.r or b_shape[1] != spec.r:
            problems.append(f"{path}: {module} has lora_A {a_shape} and lora_B {b_shape}; with "
                            f"r={spec.r} they must be (r, in_features) and (out_features, r)")
    if problems:
        raise AdapterError(problems)
    return pairs


def peft_lora_config(spec: AdapterSpec, base_model: str | None = None) -> dict:
    """Return the PEFT LoraConfig, as a dict for adapter_config.json, that rebuilds ``spec``.

    Fields PEFT would fill with its defaults are written too, because other readers of PEFT
    folders, such as llama.cpp's convert_lora_to_gguf.py, index the JSON without defaults.
    """
    alpha = spec.lora_alpha
    if float(alpha).is_integer():
        alpha = int(alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or spec.base_model,
        "revision": None,
        "r": spec.r,
        "lora_alpha": alpha,
        "lora_dropout": spec.lora_dropout,
        "use_rslora": spec.use_rslora,
        **target_fields(spec.target_modules, spec.layers),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }


def check_output_folder(source: Path, output: Path, overwrite: bool, writes_peft: bool) -> None:
    """Raise AdapterError unless ``output`` may receive the converted adapter.

    An adapter already in ``output`` is replaced only with ``overwrite`` and only when it has
    the format being written, so a conversion never destroys an adapter of the other format.
    """
    if output.exists() and not output.is_dir():
        raise AdapterError(f"{output} is a file; pass a folder for the converted adapter")
    if output.resolve() == source.resolve():
        raise AdapterError(f"{output} is the source adapter folder; pass another folder, because "
                           "both formats name their config adapter_config.json")
    if not (output / CONFIG_FILE).exists():
        return
    if is_peft_folder(output) != writes_peft:
        other = "an mlxlora" if writes_peft else "a PEFT"
        raise AdapterError(f"{output} already contains {other} adapter; pass an empty or new folder")
    if not overwrite:
        raise AdapterError(f"{output} already contains an adapter; pass --force to replace it")


def export_peft(adapter_folder: Path, output_folder: Path, base_model: str | None = None,
                dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the mlxlora adapter in ``adapter_folder`` as a PEFT LoRA adapter; return its config.

    ``base_model`` replaces the base model name recorded in the adapter, for example with the
    Hub id of the model a GGUF file was converted from. float32 output keeps every bit.
    """
    adapter_folder, output_folder = Path(adapter_folder), Path(output_folder)
    if dtype not in EXPORT_DTYPES:
        raise AdapterError(f"--dtype {dtype!r} is invalid; use {', '.join(EXPORT_DTYPES)}")
    if is_peft_folder(adapter_folder):
        raise AdapterError(f"{adapter_folder} already contains a PEFT adapter; PEFT and mlxlora load "
                           "it as it is")

    spec = read_adapter_spec(adapter_folder)
    pairs = read_lora_pairs(adapter_folder, spec)
    check_output_folder(adapter_folder, output_folder, overwrite, writes_peft=True)
    config = peft_lora_config(spec, base_model)
    if not base_model and spec.base_model.endswith(".gguf"):
        logger.warning("base_model_name_or_path is the GGUF file %s, which PEFT's "
                       "AutoPeftModelForCausalLM cannot load as a base model; pass --base-model "
                       "with the Hub id of the same model.", spec.base_model)

    tensors = {}
    for module, pair in pairs.items():
        for matrix, value in pair.items():
            tensors[peft_key(module, matrix)] = value.astype(EXPORT_DTYPES[dtype])

    # The config goes last: a folder without it is not taken for a finished adapter.
    output_folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(output_folder / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    atomic_write_json(output_folder / CONFIG_FILE, config)
    return config


def import_peft(model: nn.Module, peft_folder: Path, output_folder: Path, base_model: str,
                overwrite: bool = False) -> AdapterSpec:
    """Convert the PEFT adapter in ``peft_folder`` into an mlxlora adapter folder.

    ``model`` is the base model, loaded from ``base_model``. The new folder records its
    fingerprint, so later loads check the base model as they do for adapters mlxlora trained.
    """
    peft_folder, output_folder = Path(peft_folder), Path(output_folder)
    if not is_peft_folder(peft_folder):
        raise AdapterError(f"{peft_folder / CONFIG_FILE} is missing or has no peft_type; pass a "
                           "folder saved by PEFT's save_pretrained")
    check_output_folder(peft_folder, output_folder, overwrite, writes_peft=False)

    fingerprint, signature = base_fingerprint(model), base_signature(model)
    spec = load_peft_adapter(model, peft_folder)
    spec = replace(spec, base_model=base_model, base_fingerprint=fingerprint,
                   base_signature=signature, format="mlxlora")
    save_adapter(output_folder, model, spec)
    return spec

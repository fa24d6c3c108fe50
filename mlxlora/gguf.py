"""Load llama-architecture GGUF files (llama.cpp's format) as mlx-lm llama models.

``mx.load`` reads the tensors: Q4_0, Q4_1 and Q8_0 come back in MLX's affine format
(``weight`` packed in uint32 plus ``scales`` and ``biases``, group size 32), F16 and F32 as
float arrays. It also turns some other types, k-quants included, into float16 without a
word, so this module reads the tensor types from the file header first and rejects those.
"""

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from mlx_lm.models import llama

from mlxlora.errors import ModelError

SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1")

GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# struct formats of the fixed-size GGUF metadata value types.
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass
class TensorInfo:
    type_name: str
    shape: tuple[int, ...]  # row-major, like numpy: (out_features, in_features) for weights


@dataclass
class GGUFHeader:
    """Scalar metadata, array lengths and tensor descriptions of a GGUF file."""

    path: Path
    scalars: dict = field(default_factory=dict)
    array_lengths: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


class _Cursor:
    """Read little-endian GGUF values from a buffer, advancing an offset."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.offset = 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        raw = self.buffer[self.offset:self.offset + length]
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def skip_values(self, value_type: GGUFValueType, count: int):
        if value_type == GGUFValueType.STRING:
            for _ in range(count):
                length = self.unpack("<Q")
                self.offset += length
        elif value_type in SCALAR_FORMATS:
            self.offset += struct.calcsize(SCALAR_FORMATS[value_type]) * count
        else:
            raise ValueError(f"nested or unknown array item type {value_type}")


def read_header(path: Path) -> GGUFHeader:
    """Read metadata scalars and tensor types without loading tensor data.

    Arrays (tokens, merges, scores) are skipped and only their lengths kept, so this
    takes milliseconds where ``gguf.GGUFReader`` parses every token.
    """
    path = Path(path)
    header = GGUFHeader(path)
    try:
        with open(path, "rb") as handle:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                _read_into(header, _Cursor(buffer))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: not a readable GGUF file ({error}).") from error
    return header


def _read_into(header: GGUFHeader, cursor: _Cursor):
    magic = cursor.buffer[:4]
    if magic != b"GGUF":
        raise ValueError(f"the file starts with {magic!r}, not b'GGUF'")
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old, convert the model again with llama.cpp")

    tensor_count = cursor.unpack("<Q")
    kv_count = cursor.unpack("<Q")

    for _ in range(kv_count):
        key = cursor.string()
        value_type = GGUFValueType(cursor.unpack("<I"))
        if value_type == GGUFValueType.ARRAY:
            item_type = GGUFValueType(cursor.unpack("<I"))
            count = cursor.unpack("<Q")
            header.array_lengths[key] = count
            cursor.skip_values(item_type, count)
        elif value_type == GGUFValueType.STRING:
            header.scalars[key] = cursor.string()
        elif value_type == GGUFValueType.FLOAT32:
            # The shortest decimal that round-trips in float32, so 1e-5 stays 1e-05.
            header.scalars[key] = float(str(np.float32(cursor.unpack("<f"))))
        else:
            header.scalars[key] = cursor.unpack(SCALAR_FORMATS[value_type])

    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        type_id = cursor.unpack("<I")
        cursor.unpack("<Q")  # data offset
        try:
            type_name = GGMLQuantizationType(type_id).name
        except ValueError:
            type_name = f"unknown type {type_id}"
        # GGUF lists dimensions innermost first.
        header.tensors[name] = TensorInfo(type_name, tuple(reversed(dims)))


def map_tensor_name(gguf_name: str) -> str | None:
    """Return the mlx-lm llama parameter name for a GGUF tensor name, or None if unknown.

    The suffix (``weight``, or ``scales``/``biases`` that ``mx.load`` adds) is kept.
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if not stem:
        return None

    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"

    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{suffix}"
    return None


def unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation, restoring Hugging Face's row order.

    llama.cpp's converter views the rows of each head as (2, head_dim / 2) and swaps
    those axes, so that its interleaved RoPE matches the half-split RoPE of HF weights.
    Quantized rows (packed weights, scales, biases) move the same way because GGUF
    quantizes within a row.
    """
    rows = array.shape[0]
    half = rows // n_heads // 2
    rest = array.shape[1:]
    grouped = array.reshape(n_heads, half, 2, *rest)
    return grouped.swapaxes(1, 2).reshape(array.shape)


def _metadata_value(header: GGUFHeader, key: str, problems: list[str], default=None):
    if key in header.scalars:
        return header.scalars[key]
    if default is None:
        problems.append(f"metadata key '{key}' is missing.")
    return default


def _listing(names: list[str], limit: int = 4) -> str:
    first_names = ", ".join(names[:limit])
    if len(names) <= limit:
        return first_names
    return f"{first_names} and {len(names) - limit} more"


def check_tensors(header: GGUFHeader) -> list[str]:
    """Return one problem per unsupported tensor type and one for unknown tensor names."""
    by_type: dict[str, list[str]] = {}
    unknown = []
    for name, info in header.tensors.items():
        if info.type_name not in SUPPORTED_TYPES:
            by_type.setdefault(info.type_name, []).append(name)
        if map_tensor_name(name) is None:
            unknown.append(name)

    problems = []
    for type_name, names in by_type.items():
        problems.append(
            f"tensor type {type_name} ({_listing(names)}) is not supported. Supported types "
            f"are {', '.join(SUPPORTED_TYPES)}: use a GGUF quantized with one of these "
            "(llama.cpp's llama-quantize with Q4_1 or Q8_0, for example) or the original "
            "HF model."
        )
    if unknown:
        problems.append(
            f"unknown tensors for a plain llama model: {_listing(unknown)}. Such a model "
            "has only token_embd, output_norm, output and blk.N.attn_q/attn_k/attn_v/"
            "attn_output/attn_norm/ffn_gate/ffn_up/ffn_down/ffn_norm."
        )
    return problems


def _llama_dimensions(header: GGUFHeader, problems: list[str]) -> dict:
    def value(key, default=None):
        return _metadata_value(header, f"llama.{key}", problems, default)

    hidden_size = value("embedding_length")
    n_heads = value("attention.head_count")
    config = {
        "hidden_size": hidden_size,
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": value("attention.head_count_kv", n_heads),
        "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(value("rope.freq_base", 10000.0)),
        "max_position_embeddings": value("context_length", 2048),
        "vocab_size": header.array_lengths.get("tokenizer.ggml.tokens")
        or value("vocab_size"),
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }

    if hidden_size and n_heads:
        head_dim = value("attention.key_length", hidden_size // n_heads)
        config["head_dim"] = head_dim
        rope_dims = value("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            problems.append(
                f"RoPE covers {rope_dims} of {head_dim} head dimensions, but llama "
                "supports only full rotary embeddings."
            )

    scaling = header.scalars.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        factor = value("rope.scaling.factor")
        if factor is not None:
            config["rope_scaling"] = {"type": "linear", "factor": float(factor)}
    elif scaling != "none":
        problems.append(f"RoPE scaling '{scaling}' is not supported (only linear).")

    if header.scalars.get("llama.expert_count", 0):
        problems.append("mixture-of-experts llama models are not supported.")
    return config


def config_from_header(header: GGUFHeader) -> dict:
    """Build an HF-style llama config dict from GGUF metadata, or raise ModelError."""
    architecture = header.scalars.get("general.architecture")
    if architecture != "llama":
        raise ModelError(
            f"{header.path}: architecture '{architecture}' is not supported. Only 'llama' "
            "GGUF files load, so pass the original Hugging Face model instead."
        )

    problems = []
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    config.update(_llama_dimensions(header, problems))
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in header.scalars:
            config[key] = header.scalars[f"tokenizer.ggml.{key}"]

    problems += check_tensors(header)
    if problems:
        raise ModelError(problems, header=f"{header.path} cannot be loaded:")

    quantization = quantization_config(header)
    if quantization:
        config["quantization"] = quantization
    return config


def _quantized_params(info: TensorInfo) -> dict:
    # mx.load unpacks all three quantized GGUF types with groups of 32 weights.
    return {"group_size": 32, "bits": 8 if info.type_name == "Q8_0" else 4}


def quantization_config(header: GGUFHeader) -> dict | None:
    """Return mlx-lm's quantization entry: the common bits and group size, plus one
    entry per module whose settings differ (mlx-lm's per-layer format)."""
    per_module = {}
    for name, info in header.tensors.items():
        if info.type_name in QUANTIZED_TYPES:
            module_path = map_tensor_name(name).rpartition(".")[0]
            per_module[module_path] = _quantized_params(info)
    if not per_module:
        return None

    counts = Counter((p["group_size"], p["bits"]) for p in per_module.values())
    (group_size, bits), _ = counts.most_common(1)[0]
    quantization = {"group_size": group_size, "bits": bits}
    for module_path, params in sorted(per_module.items()):
        if (params["group_size"], params["bits"]) != (group_size, bits):
            quantization[module_path] = params
    return quantization


def read_gguf_config(path) -> dict:
    """Return the HF-style llama config of a GGUF file, reading only its header."""
    return config_from_header(read_header(Path(path)))


def convert_weights(raw: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Rename GGUF tensors to mlx-lm llama names and undo the q/k row permutation."""
    weights = {}
    for gguf_name, array in raw.items():
        name = map_tensor_name(gguf_name)
        if ".self_attn.q_proj." in name:
            array = unpermute_rows(array, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            array = unpermute_rows(array, config["num_key_value_heads"])
        weights[name] = array
    return weights


def build_model(config: dict, weights: dict[str, mx.array]) -> nn.Module:
    """Create a llama model, quantize the modules that have scales, and load weights."""
    model = llama.Model(llama.ModelArgs.from_dict(config))
    quantization = config.get("quantization")

    if quantization:
        def quantize_params(path, module):
            if f"{path}.scales" not in weights:
                return False
            return quantization.get(path, {
                "group_size": quantization["group_size"], "bits": quantization["bits"]
            })

        nn.quantize(model, class_predicate=quantize_params)

    model.load_weights(list(weights.items()), strict=True)
    return model


def load_gguf(path) -> tuple[nn.Module, dict, dict]:
    """Load a llama GGUF file and return (model, config, metadata).

    ``metadata`` is the raw GGUF metadata from ``mx.load``; the tokenizer is built from it.
    """
    path = Path(path)
    config = config_from_header(read_header(path))

    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise ModelError(f"{path}: reading tensors failed ({error}).") from error

    weights = convert_weights(raw, config)
    try:
        model = build_model(config, weights)
    except ValueError as error:
        raise ModelError(
            f"{path}: the tensors do not fit the llama shape that its metadata "
            f"describes ({error})."
        ) from error

    mx.eval(model.parameters())
    return model, config, metadata

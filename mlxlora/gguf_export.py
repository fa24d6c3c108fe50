"""Write a llama-family mlx-lm model and its tokenizer as an F16 or F32 GGUF file.

This is the inverse of ``mlxlora.gguf``'s loader: tensors get llama.cpp's names, q/k rows
get llama.cpp's row permutation back, and the tokenizer is described by the
``tokenizer.ggml.*`` keys that ``mlxlora.gguf_tokenizer`` (and llama.cpp) read. The file is
written with the ``gguf`` package's GGUFWriter.
"""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGUFWriter, LlamaFileType, RopeScalingType, TokenType
from mlx.utils import tree_flatten

from mlxlora.errors import ModelError
from mlxlora.gguf import BLOCK_TENSORS, GLOBAL_TENSORS
from mlxlora.gguf_tokenizer import LLAMA3_SPLIT, SPIECE_SPACE

GLOBAL_NAMES = {mlx_name: gguf_name for gguf_name, mlx_name in GLOBAL_TENSORS.items()}
BLOCK_NAMES = {mlx_name: gguf_name for gguf_name, mlx_name in BLOCK_TENSORS.items()}
BLOCK_PARAMETER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight)$")

FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def gguf_tensor_name(name: str) -> str | None:
    """Return llama.cpp's name for an mlx-lm llama parameter, or None if it has none."""
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"

    match = BLOCK_PARAMETER.match(name)
    if match and match.group(2) in BLOCK_NAMES:
        return f"blk.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.weight"
    return None


def permute_rows(array: np.ndarray, n_heads: int) -> np.ndarray:
    """Apply llama.cpp's q/k row permutation, the inverse of ``mlxlora.gguf.unpermute_rows``.

    Within each head, row i of the first half and row i of the second half become rows
    2i and 2i + 1, which is the pairing llama.cpp's interleaved RoPE rotates together.
    """
    half = array.shape[0] // n_heads // 2
    grouped = array.reshape(n_heads, 2, half, *array.shape[1:])
    return grouped.swapaxes(1, 2).reshape(array.shape)


def float_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Return every parameter as a float array, dequantizing quantized layers."""
    quantized = {path: module for path, module in model.named_modules()
                 if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        module = quantized.get(owner)
        if module is None:
            weights[name] = value
        elif leaf == "weight":
            weights[name] = mx.dequantize(module.weight, module.scales, module.get("biases"),
                                          group_size=module.group_size, bits=module.bits,
                                          mode=module.mode)
        elif leaf == "bias":
            weights[name] = value
    return weights


def gguf_tensors(model: nn.Module, config: dict, file_type: str) -> dict[str, np.ndarray]:
    """Return the GGUF tensors of a llama model: renamed, q/k permuted, cast to F16/F32.

    1-D tensors (the norms) stay F32 in an F16 file, as llama.cpp's converter keeps them.
    """
    tensors = {}
    unknown = []
    for name, value in float_parameters(model).items():
        gguf_name = gguf_tensor_name(name)
        if gguf_name is None:
            unknown.append(name)
            continue

        array = np.array(value.astype(mx.float32))
        if ".self_attn.q_proj." in name:
            array = permute_rows(array, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            array = permute_rows(array, config.get("num_key_value_heads")
                                 or config["num_attention_heads"])
        if file_type == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        tensors[gguf_name] = array

    if unknown:
        listed = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise ModelError(f"--export-gguf: the model has parameters that a plain llama GGUF has "
                         f"no place for ({listed}). Only llama models without biases export.")
    return tensors


def add_model_metadata(writer: GGUFWriter, config: dict, file_type: str, name: str) -> None:
    """Write the llama.* hyperparameters that ``mlxlora.gguf`` and llama.cpp read."""
    hidden_size = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden_size // n_heads

    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[file_type])

    rope_scaling = config.get("rope_scaling")
    if rope_scaling:
        kind = rope_scaling.get("type") or rope_scaling.get("rope_type")
        if kind != "linear":
            raise ModelError(f"--export-gguf: RoPE scaling '{kind}' cannot be exported; only "
                             "linear scaling is supported.")
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_scaling["factor"]))


def backend_json(tokenizer) -> dict:
    """Return the tokenizers-library JSON of an mlx-lm TokenizerWrapper's fast tokenizer."""
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("--export-gguf: the tokenizer is not a fast (tokenizer.json) "
                         "tokenizer, so its vocabulary cannot be written to GGUF.")
    return json.loads(backend.to_str())


def byte_level_pre_type(pre_tokenizer: dict | None) -> str | None:
    """Return the ``tokenizer.ggml.pre`` name of a byte-level pre-tokenizer, or None.

    These are the pre-tokenizers that ``mlxlora.gguf_tokenizer`` builds for each name.
    """
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    if pre_tokenizer.get("type") != "Sequence":
        return None

    steps = pre_tokenizer.get("pretokenizers", [])
    types = [step.get("type") for step in steps]
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {})
        if pattern.get("Regex") == LLAMA3_SPLIT and not steps[1].get("use_regex", True):
            return "llama-bpe"
    return None


def adds_space_prefix(backend: dict) -> bool:
    """Return whether a sentencepiece-style tokenizer puts "▁" before the first word."""
    normalizer = backend.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    if any(step.get("type") == "Prepend" and step.get("prepend") == SPIECE_SPACE
           for step in steps):
        return True
    pre_tokenizer = backend.get("pre_tokenizer") or {}
    # NOTE: newer HF llama tokenizers mark the prefix with a Metaspace pre-tokenizer;
    # this reading of it is untested against such a tokenizer.
    return (pre_tokenizer.get("type") == "Metaspace"
            and pre_tokenizer.get("prepend_scheme", "always") != "never")


def vocabulary(backend: dict, vocab_size: int) -> tuple[list[str], dict[int, dict]]:
    """Return the token strings by id, padded to the model's vocabulary size, and the added
    tokens by id."""
    vocab = dict(backend["model"]["vocab"])
    added = {entry["id"]: entry for entry in backend.get("added_tokens", [])}
    for token_id, entry in added.items():
        vocab.setdefault(entry["content"], token_id)

    count = max(vocab.values()) + 1
    if count > vocab_size:
        raise ModelError(f"--export-gguf: the tokenizer has {count} tokens but the model's "
                         f"embedding has only {vocab_size} rows.")
    # llama.cpp's convert_hf_to_gguf.py also fills unused embedding rows with [PAD<id>]
    # tokens of type UNUSED.
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    for token, token_id in vocab.items():
        tokens[token_id] = token
    return tokens, added


def token_types(tokens: list[str], added: dict[int, dict], unk_id: int | None,
                sentencepiece: bool) -> list[int]:
    types = []
    for token_id, token in enumerate(tokens):
        if token_id == unk_id:
            types.append(TokenType.UNKNOWN)
        elif token_id in added:
            types.append(TokenType.CONTROL if added[token_id].get("special")
                         else TokenType.USER_DEFINED)
        elif token.startswith("[PAD") and token == f"[PAD{token_id}]":
            types.append(TokenType.UNUSED)
        elif sentencepiece and BYTE_TOKEN.match(token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return [int(value) for value in types]


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges", []):
        left, right = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
        pairs.append((left, right))
    return pairs


def merge_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Return sentencepiece scores whose ranking reproduces the BPE merge order.

    ``mlxlora.gguf_tokenizer.sentencepiece_merges`` ranks the splits of each piece by the
    piece's score, highest first. Scoring a piece by minus the rank of the first merge that
    produces it gives back the same merge list for tokenizers built from GGUF scores.
    Pieces that no merge produces get a score below every merged piece.
    """
    first_rank = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    lowest = -float(len(merges) + 1)
    return [-float(first_rank[token]) if token in first_rank else
            (0.0 if len(token) <= 1 else lowest) for token in tokens]


def add_tokenizer_metadata(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write the tokenizer.ggml.* keys of a byte-level BPE or sentencepiece-style tokenizer."""
    from mlxlora.prompt import uses_bos

    backend = backend_json(tokenizer)
    model = backend["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"--export-gguf: tokenizer model {model.get('type')} cannot be "
                         "exported; only BPE tokenizers (GPT-2 style or sentencepiece BPE) can.")

    sentencepiece = bool(model.get("byte_fallback"))
    tokens, added = vocabulary(backend, vocab_size)
    unk_id = tokenizer.unk_token_id if sentencepiece else None
    merges = merge_pairs(model)

    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(merge_scores(tokens, merges))
        writer.add_add_space_prefix(adds_space_prefix(backend))
    else:
        pre_type = byte_level_pre_type(backend.get("pre_tokenizer"))
        if pre_type is None:
            raise ModelError(
                "--export-gguf: the tokenizer's pre-tokenizer "
                f"({json.dumps(backend.get('pre_tokenizer'))[:120]}) has no GGUF name that "
                "mlxlora can load; supported: GPT-2, SmolLM and Llama 3 byte-level BPE.")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_type)
        writer.add_token_merges([f"{left} {right}" for left, right in merges])

    writer.add_token_list(tokens)
    writer.add_token_types(token_types(tokens, added, unk_id, sentencepiece))
    add_special_ids(writer, tokenizer)
    writer.add_add_bos_token(uses_bos(tokenizer))
    writer.add_add_eos_token(False)

    template = tokenizer.chat_template
    if template:
        writer.add_chat_template(template)


def add_special_ids(writer: GGUFWriter, tokenizer) -> None:
    ids = {
        writer.add_bos_token_id: tokenizer.bos_token_id,
        writer.add_eos_token_id: tokenizer.eos_token_id,
        writer.add_unk_token_id: tokenizer.unk_token_id,
        writer.add_pad_token_id: tokenizer.pad_token_id,
    }
    for add, token_id in ids.items():
        if token_id is not None:
            add(int(token_id))


def export_gguf(path: Path, model: nn.Module, config: dict, tokenizer, *,
                file_type: str = "f16", name: str = "model") -> None:
    """Write ``model`` (a llama, float or quantized) and ``tokenizer`` as a GGUF file.

    ``file_type`` is "f16" or "f32"; quantized layers are dequantized first. The file is
    written to a temporary name and renamed, so a failed export leaves no partial file.
    """
    if config.get("model_type") != "llama":
        raise ModelError(f"--export-gguf: only llama models can be exported, not "
                         f"{config.get('model_type')}.")
    if file_type not in FILE_TYPES:
        raise ModelError(f"--gguf-type {file_type!r} is invalid. Use f16 or f32.")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = gguf_tensors(model, config, file_type)
    writer = GGUFWriter(str(temporary), "llama")
    try:
        add_model_metadata(writer, config, file_type, name)
        add_tokenizer_metadata(writer, tokenizer, config["vocab_size"])
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        writer.close()
        temporary.unlink(missing_ok=True)

"""Build a Hugging Face fast tokenizer from the vocabulary stored in GGUF metadata.

transformers 5.25 fails to load a GGUF tokenizer when torch is not installed, so this builds
the ``tokenizers`` pipeline directly and wraps it in ``PreTrainedTokenizerFast`` and then in
mlx-lm's ``TokenizerWrapper``. Two GGUF vocabularies are supported:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from ``tokens`` and ``merges``, with
  the pre-tokenizer that the original HF tokenizer of that ``tokenizer.ggml.pre`` uses.
- ``tokenizer.ggml.model == "llama"``: a sentencepiece BPE vocabulary (``tokens``,
  ``scores``, ``token_type``), rebuilt as HF BPE whose merge ranks follow the scores,
  with byte fallback and the "▁" word-boundary symbol.
"""

from pathlib import Path

import mlx.core as mx
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mlxlora.errors import ModelError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF stores "no such token" as the largest uint32.
NO_TOKEN = 2**32 - 1

SPIECE_SPACE = "▁"

# The split regex of Llama 3's tokenizer.json, used before byte-level mapping.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre_type: str):
    """Return the pre-tokenizer of the HF original for a ``tokenizer.ggml.pre`` value."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_type in ("gpt-2", "default"):
        return byte_level
    if pre_type == "smollm":
        # SmolLM2's tokenizer.json: every digit is its own pre-token, then GPT-2's regex.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    if pre_type == "llama-bpe":
        # NOTE: written from Llama 3's tokenizer.json and not tested against a Llama 3 GGUF.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return None


SUPPORTED_PRE_TYPES = ("gpt-2", "default", "smollm", "llama-bpe")


def _value(metadata: dict, key: str, default=None):
    """Return a GGUF metadata value as a Python scalar (mx.load returns 0-d arrays)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.tolist()
    return value


def _token_id(metadata: dict, key: str, vocab_size: int) -> int | None:
    token_id = _value(metadata, f"tokenizer.ggml.{key}")
    if token_id is None or token_id == NO_TOKEN or token_id >= vocab_size:
        return None
    return int(token_id)


def _first_ids(tokens: list[str]) -> dict[str, int]:
    # A GGUF vocabulary can repeat a string, usually in unused slots. The first id wins.
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _gpt2_backend(metadata: dict, tokens: list[str], path: Path) -> Tokenizer:
    pre_type = _value(metadata, "tokenizer.ggml.pre", "default")
    pre_tokenizer = _byte_level_pre_tokenizer(pre_type)
    if pre_tokenizer is None:
        raise ModelError(
            f"{path}: BPE pre-tokenizer '{pre_type}' is not supported (supported: "
            f"{', '.join(SUPPORTED_PRE_TYPES)}). Use the model's original Hugging Face "
            "folder, which carries its tokenizer.json."
        )

    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab=_first_ids(tokens), merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]):
    """Derive BPE merges from a sentencepiece vocabulary.

    Sentencepiece BPE repeatedly joins the adjacent pair whose joined piece has the
    highest score; HF BPE joins the pair with the lowest merge rank. Ranking every split of
    a normal piece by that piece's score (highest first) makes the two agree.
    """
    normal = {
        token: index for index, token in enumerate(tokens) if types[index] == NORMAL
    }
    ranked = []
    for piece, piece_id in normal.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in normal and right in normal:
                key = (-scores[piece_id], piece_id, normal[left], normal[right])
                ranked.append((key, (left, right)))
    ranked.sort()
    return [pair for _, pair in ranked]


def _llama_backend(metadata: dict, tokens: list[str], path: Path) -> Tokenizer:
    count = len(tokens)
    scores = _value(metadata, "tokenizer.ggml.scores") or [0.0] * count
    types = _value(metadata, "tokenizer.ggml.token_type") or [NORMAL] * count
    unk_id = _token_id(metadata, "unknown_token_id", count)

    model = models.BPE(
        vocab=_first_ids(tokens),
        merges=sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)

    add_space_prefix = bool(_value(metadata, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)

    decode_steps = [
        decoders.Replace(SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def _add_special_tokens(backend: Tokenizer, tokens: list[str], types: list[int]):
    """Register control tokens as special and user-defined tokens as plain added tokens,
    so that text containing them maps to their single id."""
    added = []
    for index, token in enumerate(tokens):
        if types[index] in (CONTROL, USER_DEFINED):
            added.append(
                AddedToken(token, special=types[index] == CONTROL, normalized=False)
            )
    backend.add_tokens(added)


def _set_post_processor(backend: Tokenizer, bos: str | None, eos: str | None,
                        add_bos: bool, add_eos: bool):
    prefix = [bos] if add_bos and bos else []
    suffix = [eos] if add_eos and eos else []
    if not prefix and not suffix:
        return

    single = " ".join(prefix + ["$A"] + suffix)
    pair = " ".join(prefix + ["$A"] + suffix + prefix + ["$B:1"] + suffix)
    special = {token: backend.token_to_id(token) for token in prefix + suffix}
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(special.items())
    )


def build_gguf_tokenizer(metadata: dict, path) -> TokenizerWrapper:
    """Return an mlx-lm TokenizerWrapper for the vocabulary in GGUF ``metadata``."""
    path = Path(path)
    kind = _value(metadata, "tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{path}: the GGUF file has no tokenizer.ggml.tokens vocabulary.")
    count = len(tokens)
    types = _value(metadata, "tokenizer.ggml.token_type") or [NORMAL] * count

    if kind == "gpt2":
        backend = _gpt2_backend(metadata, tokens, path)
        detokenizer = BPEStreamingDetokenizer
        add_bos_default = False
    elif kind == "llama":
        backend = _llama_backend(metadata, tokens, path)
        trim = bool(_value(metadata, "tokenizer.ggml.add_space_prefix", True))
        detokenizer = lambda tokenizer: SPMStreamingDetokenizer(tokenizer, trim_space=trim)  # noqa: E731
        add_bos_default = True
    else:
        raise ModelError(
            f"{path}: tokenizer type '{kind}' is not supported (supported: gpt2, llama). "
            "Use the model's original Hugging Face folder instead."
        )

    _add_special_tokens(backend, tokens, types)

    def token(key):
        token_id = _token_id(metadata, key, count)
        return tokens[token_id] if token_id is not None else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(_value(metadata, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_value(metadata, "tokenizer.ggml.add_eos_token", False))
    _set_post_processor(backend, bos, eos, add_bos, add_eos)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=_value(metadata, "tokenizer.chat_template"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )
    return TokenizerWrapper(hf_tokenizer, detokenizer)

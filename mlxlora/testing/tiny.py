"""Build a tiny llama and a byte-level tokenizer with a ChatML template, in memory.

Tests, benchmarks and the recipe checks use these so that they run in seconds and need no
downloaded weights.
"""

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_vocab() -> dict[str, int]:
    """Map the 256 byte-level symbols of GPT-2's pre-tokenizer, then the special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab


def make_tokenizer(chat_template: str | None = CHATML_TEMPLATE, bos: bool = False):
    """Return an mlx-lm TokenizerWrapper around a byte-level BPE tokenizer without merges.

    Every byte is one token, so token counts equal UTF-8 byte counts plus special tokens.
    With ``bos=True`` the tokenizer prepends ``<|endoftext|>`` as BOS, like llama's ``<s>``.
    """
    backend = Tokenizer(models.BPE(vocab=byte_level_vocab(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)

    if bos:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A",
            special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))],
        )

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>" if bos else None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=chat_template,
    )
    return TokenizerWrapper(hf_tokenizer)


def make_model(vocab_size: int = 260, hidden_size: int = 32, layers: int = 2, seed: int = 0,
               tie_word_embeddings: bool = False) -> llama.Model:
    """Return a randomly initialised float32 mlx-lm llama small enough for unit tests."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def save_model_folder(folder, model=None, tokenizer=None) -> "Path":
    """Save a tiny llama and its tokenizer as an MLX-format folder that load_model reads."""
    import dataclasses
    from pathlib import Path

    from mlx_lm.utils import save_config, save_model

    folder = Path(folder)
    model = model or make_model()
    # transformers' AutoConfig, which AutoTokenizer reads, rejects null fields.
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    save_model(folder, model)
    save_config(config, folder / "config.json")
    (tokenizer or make_tokenizer())._tokenizer.save_pretrained(folder)
    return folder

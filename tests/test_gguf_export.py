import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Regex, pre_tokenizers

from mlxlora.errors import ModelError
from mlxlora.gguf import load_gguf, read_header, unpermute_rows
from mlxlora.gguf_export import (
    byte_level_pre_type,
    export_gguf,
    gguf_tensor_name,
    merge_scores,
    permute_rows,
)
from mlxlora.gguf_tokenizer import LLAMA3_SPLIT, build_gguf_tokenizer, sentencepiece_merges
from mlxlora.loading import load_model
from mlxlora.testing.tiny import make_model, make_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl.",
    "  two leading spaces and 12345 digits\nnew line",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
]


def tiny_config(tie: bool = False) -> dict:
    return {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": 260, "tie_word_embeddings": tie,
            "rope_theta": 10000.0}


def pre_tokenizer_json(pre_tokenizer) -> dict:
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    import json

    return json.loads(backend.to_str())["pre_tokenizer"]


def test_permute_rows_inverts_unpermute():
    rows = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)

    permuted = permute_rows(rows, n_heads=4)

    restored = unpermute_rows(mx.array(permuted), 4)
    assert not np.array_equal(permuted, rows)
    assert np.array_equal(np.array(restored), rows)


def test_tensor_names():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj.bias") is None


def test_pre_tokenizer_names():
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      byte_level])
    llama3 = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert byte_level_pre_type(pre_tokenizer_json(byte_level)) == "gpt-2"
    assert byte_level_pre_type(pre_tokenizer_json(smollm)) == "smollm"
    assert byte_level_pre_type(pre_tokenizer_json(llama3)) == "llama-bpe"
    assert byte_level_pre_type(pre_tokenizer_json(pre_tokenizers.Whitespace())) is None


def test_merge_scores_reproduce_merges():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    types = [1, 1, 1, 1, 1, 1, 6]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, 0.0]
    merges = sentencepiece_merges(tokens, scores, types)

    rebuilt = sentencepiece_merges(tokens, merge_scores(tokens, merges), types)

    assert rebuilt == merges


def test_export_tiny_f32_logits_equal(tmp_path):
    model = make_model()
    tokenizer = make_tokenizer()
    path = tmp_path / "tiny.gguf"

    export_gguf(path, model, tiny_config(), tokenizer, file_type="f32")

    loaded = load_model(str(path))
    tokens = mx.array([[256, 1, 72, 105, 258, 33]])
    assert mx.array_equal(loaded.model(tokens), model(tokens))
    assert loaded.config["tie_word_embeddings"] is False
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    assert loaded.tokenizer.eos_token_id == 258


def test_export_tiny_f16_close(tmp_path):
    model = make_model(tie_word_embeddings=True)
    path = tmp_path / "tiny-f16.gguf"

    export_gguf(path, model, tiny_config(tie=True), make_tokenizer(), file_type="f16")

    header = read_header(path)
    assert header.tensors["blk.0.attn_q.weight"].type_name == "F16"
    assert header.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    assert "output.weight" not in header.tensors
    loaded, config, _ = load_gguf(path)
    tokens = mx.array([[256, 1, 72, 105, 258, 33]])
    difference = mx.abs(loaded(tokens).astype(mx.float32) - model(tokens)).max().item()
    assert 0 < difference < 0.02
    assert config["tie_word_embeddings"] is True


def test_export_rejects_other_architecture(tmp_path):
    with pytest.raises(ModelError, match="only llama models can be exported, not qwen2"):
        export_gguf(tmp_path / "x.gguf", make_model(), {"model_type": "qwen2"},
                    make_tokenizer())


def test_export_rejects_unsupported_rope_scaling(tmp_path):
    config = tiny_config() | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}

    with pytest.raises(ModelError, match="RoPE scaling 'llama3' cannot be exported"):
        export_gguf(tmp_path / "x.gguf", make_model(), config, make_tokenizer())
    assert not (tmp_path / "x.gguf").exists()


def test_stories260k_round_trip(shared_data, tmp_path):
    from mlx_lm.generate import generate

    source = shared_data / "models" / "stories260K.gguf"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    original = load_model(str(source))
    path = tmp_path / "stories.gguf"

    export_gguf(path, original.model, original.config, original.tokenizer, file_type="f32")

    exported = load_model(str(path))
    tokens = mx.array([[1, 403, 407, 261, 378]])
    assert mx.array_equal(exported.model(tokens), original.model(tokens))
    for text in TEXTS:
        assert exported.tokenizer.encode(text) == original.tokenizer.encode(text)
    text = generate(exported.model, exported.tokenizer, prompt=[1], max_tokens=30)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_smollm2_tokenizer_round_trip(smollm2_gguf, tmp_path):
    _, metadata = mx.load(str(smollm2_gguf), return_metadata=True)
    tokenizer = build_gguf_tokenizer(metadata, smollm2_gguf)
    config = tiny_config(tie=True) | {"hidden_size": 8, "intermediate_size": 16,
                                      "vocab_size": 49152}
    model = make_model(vocab_size=49152, hidden_size=8, tie_word_embeddings=True)
    path = tmp_path / "smollm2-vocab.gguf"

    export_gguf(path, model, config, tokenizer, file_type="f32")

    _, exported_metadata = mx.load(str(path), return_metadata=True)
    exported = build_gguf_tokenizer(exported_metadata, path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for text in TEXTS:
        assert exported.encode(text) == tokenizer.encode(text)
    assert (exported.apply_chat_template(messages, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert exported_metadata["tokenizer.ggml.pre"] == "smollm"
    assert exported.eos_token_id == tokenizer.eos_token_id == 2

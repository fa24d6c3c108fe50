import json

import mlx.core as mx
import pytest

from mlxlora.errors import ModelError
from mlxlora.model_io import (
    checkpoint_dtype,
    collect_eos_ids,
    drop_none,
    output_config,
    output_generation_config,
    read_generation_config,
    render_model_card,
    save_model_folder,
    upload_folder,
)
from mlxlora.testing.tiny import make_model, make_tokenizer


def test_drop_none_nested():
    value = {"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None, "g": 2}], "h": 0}

    assert drop_none(value) == {"b": {"d": 1}, "e": [{"g": 2}], "h": 0}


def test_eos_ids_union_tokenizer_first():
    tokenizer = make_tokenizer()

    ids = collect_eos_ids({"eos_token_id": [256, 258]}, tokenizer, {"eos_token_id": 257})

    assert ids == [258, 256, 257]


def test_eos_ids_from_tokenizer_only():
    assert collect_eos_ids({}, make_tokenizer(), {}) == [258]


def test_output_config_drops_stale_quantization():
    config = {"model_type": "llama", "quantization": {"bits": 4, "group_size": 32},
              "quantization_config": {"bits": 4, "group_size": 32}, "rope_scaling": None,
              "_name_or_path": "x"}

    content = output_config(config, None, "float16", [2])

    assert content == {"model_type": "llama", "torch_dtype": "float16", "eos_token_id": 2}


def test_output_config_sets_quantization():
    quantization = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32,
                                                                         "bits": 8}}

    content = output_config({"model_type": "llama"}, quantization, "float16", [2, 7])

    assert content["quantization"] == quantization
    assert content["quantization_config"] == quantization
    assert content["eos_token_id"] == [2, 7]


def test_generation_config_keeps_source_settings():
    tokenizer = make_tokenizer(bos=True)

    content = output_generation_config({"top_p": 0.9, "eos_token_id": 1}, {}, tokenizer, [258])

    assert content["top_p"] == 0.9
    assert content["eos_token_id"] == 258
    assert content["bos_token_id"] == 256
    assert content["pad_token_id"] == 259


def test_read_generation_config_invalid_json(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text("{not json")

    assert read_generation_config(tmp_path) == {}
    assert "generation_config.json:1: invalid JSON" in caplog.text


def test_checkpoint_dtype_of_folder(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {"big": mx.zeros((64, 64), dtype=mx.bfloat16),
                         "norm": mx.zeros((64,), dtype=mx.float32),
                         "packed": mx.zeros((64, 8), dtype=mx.uint32)})

    assert checkpoint_dtype(tmp_path) == "bfloat16"


def test_checkpoint_dtype_of_quantized_gguf(smollm2_gguf):
    assert checkpoint_dtype(smollm2_gguf) == "float16"


def test_checkpoint_dtype_of_f32_gguf(shared_data):
    path = shared_data / "models" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")

    assert checkpoint_dtype(path) == "float32"


def test_model_card_metadata():
    card = render_model_card("fused", "out/fused", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "HuggingFaceTB/SmolLM2-135M-Instruct", ["Adapter: run (r=8)"])

    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "- Adapter: run (r=8)" in card
    assert "mlxlora chat --model out/fused" in card


def test_save_model_folder_reloads(tmp_path):
    from mlx_lm.utils import load

    model = make_model()
    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
              "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "vocab_size": 260, "tie_word_embeddings": False,
              "quantization": {"group_size": 32, "bits": 4}}

    save_model_folder(tmp_path / "out", model, make_tokenizer(), config,
                      source_path=tmp_path / "base.gguf", dtype="float32", quantization=None,
                      model_card="# card\n")

    loaded, tokenizer = load(str(tmp_path / "out"))
    tokens = mx.array([[1, 2, 3]])
    assert mx.array_equal(loaded(tokens), model(tokens))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in saved
    assert (tmp_path / "out" / "README.md").read_text() == "# card\n"


def test_upload_error_names_repo(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    def reject(self, **kwargs):
        raise LocalTokenNotFoundError("no token")

    monkeypatch.setattr(HfApi, "create_repo", reject)

    with pytest.raises(ModelError, match="--upload-repo me/model: uploading") as error:
        upload_folder(tmp_path, "me/model")

    assert "hf auth login" in str(error.value)

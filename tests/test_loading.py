"""Model loading: each --model form, its error messages, dtype and dequantization."""

import dataclasses
import importlib
import sys
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from mlxlora import loading
from mlxlora.errors import ModelError
from mlxlora.loading import default_compute_dtype, load_model, resolve_model_path
from mlxlora.testing.tiny import make_model, make_tokenizer

TOKENS = mx.array([[3, 70, 101, 250, 8, 44, 200, 9]])


def save_tiny(folder: Path, model=None, quantize_bits=None, dtype=None) -> Path:
    """Save the tiny llama and tokenizer as an MLX-format model folder."""
    model = model or make_model(hidden_size=64)
    # transformers' AutoConfig (which AutoTokenizer reads) rejects null fields.
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    if dtype is not None:
        model.set_dtype(dtype)
    if quantize_bits:
        nn.quantize(model, group_size=32, bits=quantize_bits)
        config["quantization"] = {"group_size": 32, "bits": quantize_bits}

    save_model(folder, model)
    save_config(config, folder / "config.json")
    make_tokenizer().save_pretrained(folder)
    return folder


def modules_of(model) -> dict:
    return dict(model.named_modules())


# Error messages for each bad --model form.

@pytest.mark.parametrize("spec, expected", [
    ("", "the value is empty"),
    ("/nonexistent/model.gguf", "no such .gguf file"),
    ("./missing.gguf", "no such .gguf file"),
    ("model.gguf", "no such .gguf file"),
    ("not_an_installed_package_xyz/model.gguf", "no installed Python package named"),
    ("my-models/model.gguf", "its first part is not a package name"),
    ("no spaces allowed/in ids", "not a Hub repo id"),
    ("/nonexistent/folder", "no such file or folder"),
])
def test_bad_model_form_error(spec, expected):
    with pytest.raises(ModelError) as error:
        resolve_model_path(spec)

    message = str(error.value)
    assert expected in message
    assert "Accepted forms:" in message
    assert "a local .gguf file" in message
    assert "Hugging Face Hub repo id" in message


def test_non_gguf_file_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 8)

    with pytest.raises(ModelError, match="this is a file but not a .gguf file"):
        resolve_model_path(str(path))


def test_folder_without_config_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))


def test_folder_without_safetensors_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")

    with pytest.raises(ModelError, match="has no model\\*.safetensors weights"):
        load_model(str(tmp_path))


def test_unknown_model_type_error(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    (folder / "config.json").write_text('{"model_type": "no_such_architecture"}')

    with pytest.raises(ModelError) as error:
        load_model(str(folder))

    message = str(error.value)
    assert "loading the weights in" in message
    assert "no_such_architecture" in message


def test_invalid_dtype_error(tmp_path):
    with pytest.raises(ModelError, match="--dtype 'float64' is invalid"):
        load_model(str(tmp_path), dtype="float64")


# PACKAGE/FILE.gguf.

@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_mlxlora_models"
    package.mkdir()
    # Importing the package would fail, so resolution must not import it.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return package


def test_package_file_resolves(fake_package):
    path = resolve_model_path("fake_mlxlora_models/Tiny.Q4_1.gguf")

    assert path == fake_package / "Tiny.Q4_1.gguf"
    assert "fake_mlxlora_models" not in sys.modules


def test_package_missing_file_lists_ggufs(fake_package):
    with pytest.raises(ModelError) as error:
        resolve_model_path("fake_mlxlora_models/Other.gguf")

    message = str(error.value)
    assert "package 'fake_mlxlora_models'" in message
    assert "has no file 'Other.gguf'" in message
    assert "It contains: Tiny.Q4_1.gguf." in message


# Hugging Face Hub repo ids (the network is never used: snapshot_download is replaced).

def test_hub_offline_not_cached_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)

    with pytest.raises(ModelError) as error:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")

    message = str(error.value)
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct'" in message
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert "local .gguf file" in message


def test_hub_unreachable_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Connection refused and no cached snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)

    with pytest.raises(ModelError) as error:
        resolve_model_path("someone/missing-model")

    message = str(error.value)
    assert "downloading it from the Hugging Face Hub failed" in message
    assert "Connection refused and no cached snapshot" in message
    assert "hf download someone/missing-model" in message


def test_hub_repo_loads_from_snapshot(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "snapshot")
    calls = []

    def cached(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)

    loaded = load_model("someone/tiny-llama")

    assert loaded.model_id == "someone/tiny-llama"
    assert loaded.model_path == folder
    assert calls[0][0] == "someone/tiny-llama"
    assert "*.py" not in calls[0][1]["allow_patterns"]

    load_model("someone/tiny-llama", trust_remote_code=True)
    assert "*.py" in calls[1][1]["allow_patterns"]


# Local folders in HF/MLX format.

def test_folder_load_matches_source(tmp_path):
    source = make_model(hidden_size=64)
    folder = save_tiny(tmp_path / "tiny", model=source)

    loaded = load_model(str(folder))

    assert loaded.model_path == folder
    assert loaded.quantized is False
    assert loaded.dtype == "float32"
    assert loaded.config["model_type"] == "llama"
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), np.array(source(TOKENS)), atol=1e-5)

    text = "<|im_start|>user\nhé 12<|im_end|>\n"
    assert loaded.tokenizer.encode(text) == make_tokenizer().encode(text)
    assert loaded.tokenizer.eos_token == "<|im_end|>"


# dtype and dequantization.

@pytest.fixture
def quantized_folder(tmp_path):
    source = make_model(hidden_size=64)
    float_logits = np.array(source(TOKENS))
    folder = save_tiny(tmp_path / "q8", model=source, quantize_bits=8)
    return folder, float_logits


def test_dequantize_true_gives_float_modules(quantized_folder):
    folder, float_logits = quantized_folder

    loaded = load_model(str(folder), dequantize=True)

    modules = modules_of(loaded.model)
    assert loaded.quantized is False
    assert "quantization" not in loaded.config
    assert type(modules["model.layers.0.self_attn.q_proj"]) is nn.Linear
    assert type(modules["model.embed_tokens"]) is nn.Embedding
    assert modules["model.embed_tokens"].weight.shape == (260, 64)
    assert modules["lm_head"].weight.dtype == mx.float32
    # 8-bit weights keep the float model's logits to a few hundredths.
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), float_logits, atol=0.05)


def test_dequantize_false_keeps_quantized_modules(quantized_folder):
    folder, _ = quantized_folder

    quantized = load_model(str(folder), dequantize=False)
    dequantized = load_model(str(folder), dequantize=True)

    modules = modules_of(quantized.model)
    assert quantized.quantized is True
    assert quantized.dequantized is False
    assert dequantized.quantized is False
    assert dequantized.dequantized is True
    assert quantized.config["quantization"] == {"group_size": 32, "bits": 8}
    assert isinstance(modules["model.layers.1.mlp.down_proj"], nn.QuantizedLinear)
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    # Same dequantized values, so only float rounding separates the two.
    np.testing.assert_allclose(
        np.array(quantized.model(TOKENS)), np.array(dequantized.model(TOKENS)), atol=1e-4
    )


def test_dequantize_default_follows_device(quantized_folder, monkeypatch):
    folder, _ = quantized_folder

    assert load_model(str(folder)).quantized is False

    monkeypatch.setattr(loading, "on_gpu", lambda: True)
    assert load_model(str(folder)).quantized is True


def test_explicit_dtype_casts_float_parameters(tmp_path):
    folder = save_tiny(tmp_path / "tiny")

    loaded = load_model(str(folder), dtype="bfloat16")

    assert loaded.dtype == "bfloat16"
    dtypes = {value.dtype for _, value in tree_flatten(loaded.model.parameters())}
    assert dtypes == {mx.bfloat16}


def test_auto_dtype_on_cpu_is_float32(tmp_path):
    folder = save_tiny(tmp_path / "fp16", dtype=mx.float16)

    loaded = load_model(str(folder))

    assert loaded.dtype == "float32"
    assert loaded.model.model.norm.weight.dtype == mx.float32


def test_auto_dtype_on_gpu_keeps_weight_dtype(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "fp16", dtype=mx.float16)
    monkeypatch.setattr(loading, "on_gpu", lambda: True)

    loaded = load_model(str(folder))

    assert loaded.dtype == "float16"
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == mx.float16


def test_default_compute_dtype(monkeypatch):
    monkeypatch.setattr(loading, "on_gpu", lambda: False)
    assert default_compute_dtype() == "float32"

    monkeypatch.setattr(loading, "on_gpu", lambda: True)
    assert default_compute_dtype() == "keep"

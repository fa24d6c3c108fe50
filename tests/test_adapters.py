import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlora.adapters import (AdapterSpec, base_fingerprint, base_signature, load_adapter,
                              save_adapter, signatures_match)
from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.errors import AdapterError
from mlxlora.testing.tiny import make_model


def trained_adapter(tmp_path, seed=0):
    model = make_model(seed=seed)
    fingerprint, signature = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, ["attention"])
    attach_lora(model, paths, r=4, lora_alpha=8.0)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_B"):
            layer.lora_B = mx.random.normal(layer.lora_B.shape)
    spec = AdapterSpec("tiny", fingerprint, signature, 4, 8.0, 0.0, False, paths, None)
    save_adapter(tmp_path, model, spec)
    return model


def test_save_load_round_trip(tmp_path):
    trained = trained_adapter(tmp_path)
    tokens = mx.array([[3, 7, 11, 200]])

    fresh = make_model(seed=0)
    spec = load_adapter(fresh, tmp_path)
    assert spec.r == 4
    np.testing.assert_array_equal(np.array(fresh(tokens)), np.array(trained(tokens)))


def test_fingerprint_ignores_lora_and_sees_shapes():
    model = make_model(seed=0)
    before = base_fingerprint(model), base_signature(model)
    attach_lora(model, resolve_targets(model, ["q_proj"]), r=2, lora_alpha=2.0)
    assert (base_fingerprint(model), base_signature(model)) == before
    assert base_fingerprint(make_model(hidden_size=64)) != before[0]
    assert base_signature(make_model(seed=1)) != before[1]


def test_fingerprint_same_when_quantized_or_cast():
    model = make_model(hidden_size=64)
    expected = base_fingerprint(model), base_signature(model)
    nn.quantize(model, group_size=32, bits=8)
    assert base_fingerprint(model) == expected[0]
    assert signatures_match(expected[1], base_signature(model))

    half = make_model(hidden_size=64)
    half.set_dtype(mx.bfloat16)
    assert signatures_match(expected[1], base_signature(half))


def test_other_base_model_rejected(tmp_path):
    trained_adapter(tmp_path, seed=0)
    other = make_model(seed=0)
    other.model.norm.weight = other.model.norm.weight * 2
    with pytest.raises(AdapterError, match="its weights differ"):
        load_adapter(other, tmp_path)
    with pytest.raises(AdapterError, match="its parameter shapes differ"):
        load_adapter(make_model(layers=3), tmp_path)


def test_unknown_and_missing_config_fields(tmp_path):
    trained_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["r"]
    config["rank"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as error:
        load_adapter(make_model(), tmp_path)
    assert "unknown fields rank" in str(error.value)
    assert "missing fields r" in str(error.value)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(make_model(), tmp_path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(make_model(), tmp_path)


def test_shape_mismatch_named(tmp_path):
    trained_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"has shape \(4, 32\), the model needs \(8, 32\)"):
        load_adapter(make_model(), tmp_path)

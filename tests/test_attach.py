import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, lora_layers, parameter_counts, resolve_targets
from mlxlora.errors import ModelError
from mlxlora.testing.tiny import make_model

ATTENTION = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
MLP = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def block_paths(blocks, names):
    return sorted(f"model.layers.{b}.{n}" for b in blocks for n in names)


@pytest.mark.parametrize("targets, layers, expected", [
    (["all-linear"], None, block_paths([0, 1], ATTENTION + MLP)),
    (["attention"], None, block_paths([0, 1], ATTENTION)),
    (["mlp"], None, block_paths([0, 1], MLP)),
    (["q_proj"], None, block_paths([0, 1], ["self_attn.q_proj"])),
    (["self_attn.v_proj", "up_proj"], None, block_paths([0, 1], ["self_attn.v_proj", "mlp.up_proj"])),
    ([r"model\.layers\.1\.mlp\..*"], None, block_paths([1], MLP)),
    (["all-linear"], 1, block_paths([1], ATTENTION + MLP)),
    (["lm_head"], None, ["lm_head"]),
])
def test_resolve_targets_table(targets, layers, expected):
    model = make_model()
    assert sorted(resolve_targets(model, targets, layers)) == expected


def test_all_linear_never_takes_lm_head_or_embeddings():
    paths = resolve_targets(make_model(), ["all-linear"])
    assert "lm_head" not in paths
    assert not any("embed" in p for p in paths)


def test_unknown_target_lists_module_names():
    with pytest.raises(ModelError) as error:
        resolve_targets(make_model(), ["qkv_proj"])
    message = str(error.value)
    assert "'qkv_proj' matches no module" in message
    assert "self_attn.q_proj" in message
    assert "all-linear" in message


def test_embedding_target_rejected():
    with pytest.raises(ModelError, match="LoRA on embeddings is not supported"):
        resolve_targets(make_model(), ["embed_tokens"])


def test_tied_model_has_no_lm_head():
    with pytest.raises(ModelError, match="'lm_head' matches no module"):
        resolve_targets(make_model(tie_word_embeddings=True), ["lm_head"])


def test_only_lora_parameters_trainable():
    model = make_model()
    paths = resolve_targets(model, ["attention"])
    attach_lora(model, paths, r=4, lora_alpha=8.0)

    trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
    assert len(trainable) == 2 * len(paths)
    assert all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert set(lora_layers(model)) == set(paths)


def test_parameter_counts_by_formula():
    model = make_model()
    base_total, _ = parameter_counts(model)
    paths = resolve_targets(model, ["q_proj"])
    attach_lora(model, paths, r=4, lora_alpha=8.0)
    total, trainable = parameter_counts(model)

    # q_proj is 32 -> 4 heads * 8 = 32: A is (4, 32) and B is (32, 4), two blocks.
    assert trainable == 2 * (4 * 32 + 32 * 4)
    assert total == base_total + trainable


def test_attached_model_starts_equal_to_base():
    model = make_model()
    tokens = mx.array([[5, 9, 17, 33, 2]])
    before = model(tokens)
    attach_lora(model, resolve_targets(model, ["all-linear"]), r=4, lora_alpha=8.0)
    assert mx.array_equal(model(tokens), before).item()


def test_quantized_model_parameter_count():
    model = make_model(hidden_size=64)
    total_float, _ = parameter_counts(model)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    total_quantized, _ = parameter_counts(model)
    assert total_quantized == total_float

"""Quantized layers that multiply by their dequantized weight: same values and gradients as
MLX's quantized_matmul, and used for training a quantized base on a CPU."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.config import TrainConfig
from mlxlora.dequantized_matmul import (DequantizedMatmulEmbedding, DequantizedMatmulLinear,
                                        dequantized_product, use_dequantized_matmul)
from mlxlora.loading import LoadedModel
from mlxlora.lora import LoRALinear
from mlxlora.output_head import find_output_head
from mlxlora.session import attach_adapter, base_weights_note
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import make_model, make_tokenizer

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def quantized_linear(bits: int, bias: bool) -> nn.QuantizedLinear:
    mx.random.seed(3)
    return nn.QuantizedLinear.from_linear(nn.Linear(64, 48, bias=bias), group_size=32, bits=bits)


def output_and_input_gradient(layer: nn.Module, x: mx.array):
    def total(x):
        return (layer(x) * mx.arange(48)).sum()

    value = layer(x)
    gradient = mx.grad(total)(x)
    mx.eval(value, gradient)
    return np.array(value), np.array(gradient)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_quantized_matmul(bits, bias):
    layer = quantized_linear(bits, bias)
    x = mx.random.normal((2, 5, 64), key=mx.random.key(1))
    expected = output_and_input_gradient(layer, x)

    assert use_dequantized_matmul(layer) == 1
    assert type(layer) is DequantizedMatmulLinear
    actual = output_and_input_gradient(layer, x)

    np.testing.assert_allclose(actual[0], expected[0], **TOLERANCE)
    np.testing.assert_allclose(actual[1], expected[1], **TOLERANCE)


def test_untransposed_product_matches():
    layer = quantized_linear(4, bias=False)
    x = mx.random.normal((7, 48), key=mx.random.key(2))
    expected = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=False,
                                   group_size=32, bits=4)
    actual = dequantized_product(32, 4, False)(x, layer.weight, layer.scales, layer.biases)
    np.testing.assert_allclose(np.array(actual), np.array(expected), **TOLERANCE)


def test_only_affine_quantized_layers_change():
    model = nn.Sequential(nn.Linear(64, 64), quantized_linear(4, bias=True),
                          nn.QuantizedLinear(64, 64, group_size=32, bits=4, mode="mxfp4"),
                          nn.QuantizedEmbedding(100, 64, group_size=32, bits=4))

    assert use_dequantized_matmul(model) == 2
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [nn.Linear, DequantizedMatmulLinear, nn.QuantizedLinear,
                     DequantizedMatmulEmbedding]


def quantized_tied_model():
    model = make_model(tie_word_embeddings=True)
    nn.quantize(model, group_size=32, bits=4)
    mx.random.seed(1)
    attach_lora(model, resolve_targets(model, ["all-linear"]), r=4, lora_alpha=8.0)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_B = 0.05 * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())
    return model


def fixed_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(3, 17))
    mask = np.ones((3, 16), dtype=np.float32)
    mask[:, :4] = 0
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


def train_losses(model, steps=3) -> list[float]:
    """Run the compiled training step; return the loss of each step."""
    step = TrainStep(model, optim.Adam(learning_rate=1e-2), max_grad_norm=None)
    batch = fixed_batch()
    losses = []
    for _ in range(steps):
        loss, _ = step([batch], batch[2].sum().item())
        mx.eval(loss, model.state)
        losses.append(loss.item())
    return losses


def test_tied_head_keeps_fused_loss():
    model = quantized_tied_model()
    use_dequantized_matmul(model)

    head = find_output_head(model)
    assert head is not None and head.matrix is not None
    one_pass = head.matrix.for_one_pass()
    assert not one_pass.quantized
    np.testing.assert_allclose(
        np.array(one_pass.module["weight"]),
        np.array(mx.dequantize(model.model.embed_tokens.weight, model.model.embed_tokens.scales,
                               model.model.embed_tokens.biases, group_size=32, bits=4)))


def test_training_matches_quantized_matmul():
    expected = train_losses(quantized_tied_model())

    model = quantized_tied_model()
    assert use_dequantized_matmul(model) > 0
    actual = train_losses(model)

    assert expected[-1] < expected[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def loaded_quantized_model() -> LoadedModel:
    model = make_model()
    nn.quantize(model, group_size=32, bits=4)
    config = {"model_type": "llama", "hidden_size": 32, "vocab_size": 260}
    return LoadedModel(model, make_tokenizer(), "tiny", None, config, True, "float32")


def test_session_uses_product_on_cpu(monkeypatch):
    monkeypatch.setattr("mlxlora.session.on_gpu", lambda: False)
    loaded = loaded_quantized_model()
    attach_adapter(TrainConfig(model="tiny", r=4, lora_alpha=8.0), loaded)

    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear)
    assert type(q_proj.base) is DequantizedMatmulLinear


def test_session_keeps_kernel_on_gpu(monkeypatch):
    monkeypatch.setattr("mlxlora.session.on_gpu", lambda: True)
    loaded = loaded_quantized_model()
    attach_adapter(TrainConfig(model="tiny", r=4, lora_alpha=8.0), loaded)

    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base) is nn.QuantizedLinear


def test_model_log_names_quantization():
    quantized = loaded_quantized_model()
    dequantized = LoadedModel(make_model(), make_tokenizer(), "tiny", None, {}, False,
                              "float32", dequantized=True)
    plain = LoadedModel(make_model(), make_tokenizer(), "tiny", None, {}, False, "float32")

    assert base_weights_note(quantized) == ", quantized base: QLoRA"
    assert "dequantized to float32" in base_weights_note(dequantized)
    assert "--no-dequantize" in base_weights_note(dequantized)
    assert base_weights_note(plain) == ""

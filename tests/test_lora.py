import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlora.lora import LoRALinear, linear_shape, lora_scaling


def test_scaling_plain_and_rslora():
    assert lora_scaling(8, 16.0) == 2.0
    assert lora_scaling(16, 16.0, use_rslora=True) == 4.0
    assert math.isclose(lora_scaling(8, 16.0, use_rslora=True), 16.0 / math.sqrt(8))


def test_lora_starts_equal_to_base():
    mx.random.seed(1)
    base = nn.Linear(12, 20)
    x = mx.random.normal((3, 5, 12))
    layer = LoRALinear(base, r=4, lora_alpha=8.0)
    assert mx.array_equal(layer(x), base(x)).item()


def test_lora_shapes_follow_peft_layout():
    layer = LoRALinear(nn.Linear(12, 20), r=4, lora_alpha=8.0)
    assert layer.lora_A.shape == (4, 12)
    assert layer.lora_B.shape == (20, 4)
    bound = 1 / math.sqrt(12)
    assert mx.abs(layer.lora_A).max().item() <= bound
    assert mx.abs(layer.lora_A).max().item() > 0


def test_lora_forward_matches_formula():
    mx.random.seed(2)
    base = nn.Linear(6, 5, bias=True)
    layer = LoRALinear(base, r=3, lora_alpha=6.0)
    layer.lora_B = mx.random.normal((5, 3))
    x = mx.random.normal((2, 6))

    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), rtol=1e-5, atol=1e-6)


def test_delta_weight_equals_scaled_product():
    layer = LoRALinear(nn.Linear(6, 5), r=3, lora_alpha=6.0, use_rslora=True)
    layer.lora_B = mx.ones((5, 3))
    expected = (6.0 / math.sqrt(3)) * (layer.lora_B @ layer.lora_A)
    assert mx.allclose(layer.delta_weight(), expected).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_shape(bits):
    quantized = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=bits)
    assert linear_shape(quantized) == (32, 64)
    layer = LoRALinear(quantized, r=2, lora_alpha=2.0)
    x = mx.random.normal((1, 64))
    assert mx.array_equal(layer(x), quantized(x)).item()


def test_dropout_only_in_training():
    mx.random.seed(3)
    layer = LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=2.0, lora_dropout=0.5)
    layer.lora_B = mx.ones((8, 2))
    x = mx.ones((4, 8))
    layer.eval()
    first, second = layer(x), layer(x)
    assert mx.array_equal(first, second).item()
    layer.train()
    assert not mx.array_equal(layer(x), first).item()

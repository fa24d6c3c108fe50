"""The lean SwiGLU: same values and gradients as mlx-lm's MLP, less memory kept."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.lean_mlp import enable_lean_swiglu, swiglu
from mlxlora.testing.tiny import make_model


def reference_swiglu(gate, up):
    return nn.silu(gate) * up


def test_swiglu_values_and_vjp_match_autodiff():
    key_gate, key_up, key_cotangent = mx.random.split(mx.random.key(1), 3)
    gate = 4 * mx.random.normal((5, 7), key=key_gate)
    up = mx.random.normal((5, 7), key=key_up)
    cotangent = mx.random.normal((5, 7), key=key_cotangent)

    _, expected = mx.vjp(reference_swiglu, [gate, up], [cotangent])
    output, actual = mx.vjp(swiglu, [gate, up], [cotangent])

    assert mx.allclose(output[0], reference_swiglu(gate, up), rtol=1e-6, atol=1e-6).item()
    assert mx.allclose(actual[0], expected[0], rtol=1e-5, atol=1e-6).item()
    assert mx.allclose(actual[1], expected[1], rtol=1e-5, atol=1e-6).item()


def lora_model(layers: int = 2):
    model = make_model(layers=layers, seed=3)
    attach_lora(model, resolve_targets(model, ["all-linear"]), 4, 8.0)
    # A non-zero B makes the LoRA path change the output and gives A a non-zero gradient.
    for layer in model.layers:
        for module in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            module.lora_B = 0.1 * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())
    return model


def loss_and_gradients(model, tokens):
    def loss(model):
        return (model(tokens).astype(mx.float32) ** 2).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads))


def test_enable_keeps_outputs_and_gradients():
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    model = lora_model()
    value_before, grads_before = loss_and_gradients(model, tokens)

    changed = enable_lean_swiglu(model, model.args.hidden_size, mx.float32)
    value_after, grads_after = loss_and_gradients(model, tokens)

    assert changed == len(model.layers)
    assert type(model.layers[0].mlp).__name__ == "LeanMLP"
    assert abs(value_after.item() - value_before.item()) < 1e-6
    assert grads_after.keys() == grads_before.keys()
    for name, expected in grads_before.items():
        assert mx.allclose(grads_after[name], expected, rtol=1e-4, atol=1e-7).item(), name


def test_enable_twice_changes_nothing_more():
    model = lora_model()
    enable_lean_swiglu(model, model.args.hidden_size, mx.float32)

    assert enable_lean_swiglu(model, model.args.hidden_size, mx.float32) == 0
    assert type(model.layers[0].mlp).__name__ == "LeanMLP"


def test_enable_restores_training_mode():
    model = lora_model()
    model.train()

    enable_lean_swiglu(model, model.args.hidden_size, mx.float32)

    assert model.training


class GeluMLP(nn.Module):
    """Same projections as a llama MLP, but a GELU gate, so the lean forward differs."""

    def __init__(self, dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, 2 * dims, bias=False)
        self.up_proj = nn.Linear(dims, 2 * dims, bias=False)
        self.down_proj = nn.Linear(2 * dims, dims, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


def test_other_activation_keeps_its_forward():
    model = nn.Sequential(GeluMLP(8))

    changed = enable_lean_swiglu(model, 8, mx.float32)

    assert changed == 0
    assert type(model.layers[0]) is GeluMLP


def test_missing_hidden_size_changes_nothing():
    model = lora_model()

    assert enable_lean_swiglu(model, None, mx.float32) == 0
    assert type(model.layers[0].mlp).__name__ == "MLP"


def backward_peak(activation, tokens: int, hidden: int, intermediate: int) -> int:
    """Return the peak memory above the start of one MLP gradient, in bytes."""
    gate = nn.Linear(hidden, intermediate, bias=False)
    up = nn.Linear(hidden, intermediate, bias=False)
    down = nn.Linear(intermediate, hidden, bias=False)
    x = mx.random.normal((tokens, hidden))
    mx.eval(gate.parameters(), up.parameters(), down.parameters(), x)

    def loss(x):
        return down(activation(gate(x), up(x))).sum()

    mx.synchronize()
    mx.clear_cache()
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(mx.grad(loss)(x))
    return mx.get_peak_memory() - start


def test_backward_keeps_one_tensor_less():
    tokens, hidden, intermediate = 256, 16, 4096
    one_tensor = tokens * intermediate * 4

    reference = backward_peak(reference_swiglu, tokens, hidden, intermediate)
    lean = backward_peak(swiglu, tokens, hidden, intermediate)

    assert lean <= reference - one_tensor

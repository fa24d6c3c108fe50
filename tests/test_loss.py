import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.batching import mean_targets_per_step
from mlxlora.loss import (ROW_MULTIPLE, fused_cross_entropy, masked_loss, select_targets,
                          selected_loss, selected_loss_sum)
from mlxlora.output_head import find_output_head
from mlxlora.prompt import EncodedExample
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import make_model


def adapted_model(tie=False, targets=("all-linear",), quantize=False):
    model = make_model(tie_word_embeddings=tie)
    if quantize:
        nn.quantize(model, group_size=32, bits=8)
    mx.random.seed(1)
    attach_lora(model, resolve_targets(model, list(targets)), r=4, lora_alpha=8.0)
    # Non-zero B, so the adapter changes the logits and its gradients are not trivial.
    for _, module in model.named_modules():
        if hasattr(module, "lora_B"):
            module.lora_B = 0.05 * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())
    return model


def batch(rows=3, length=20, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(rows, length + 1))
    mask = np.zeros((rows, length), dtype=np.float32)
    mask[0, 5:] = 1
    mask[1, 12:17] = 1
    mask[2, 1:9] = 1
    return tokens[:, :-1], tokens[:, 1:], mask


def full_and_selected(model, normalizer=7.0):
    """Return (loss, grads) from masked_loss and from selected_loss on the same batch."""
    inputs, targets, mask = batch()
    head = find_output_head(model)
    assert head is not None
    fused = fused_cross_entropy(head.matrix) if head.matrix else None
    selection = select_targets(targets, mask)
    count = mx.array(normalizer)

    def full(model):
        return masked_loss(model, mx.array(inputs), mx.array(targets), mx.array(mask), count)

    def selected(model):
        return selected_loss(head, fused, mx.array(inputs), selection.positions,
                             selection.targets, selection.weights, count)

    results = []
    for function in (full, selected):
        loss, grads = nn.value_and_grad(model, function)(model)
        mx.eval(loss, grads)
        results.append((loss.item(), dict(tree_flatten(grads))))
    return results


def assert_same_loss_and_grads(results):
    (full_loss, full_grads), (selected_loss_value, selected_grads) = results
    assert abs(full_loss - selected_loss_value) <= 1e-5 * max(1.0, abs(full_loss))
    assert full_grads.keys() == selected_grads.keys()
    for name, expected in full_grads.items():
        np.testing.assert_allclose(np.array(selected_grads[name]), np.array(expected),
                                   rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("tie", [False, True])
def test_fused_loss_equals_full_logits(tie):
    model = adapted_model(tie=tie)
    head = find_output_head(model)
    assert head.matrix is not None
    assert_same_loss_and_grads(full_and_selected(model))


def test_quantized_head_uses_fused_loss():
    model = adapted_model(tie=True, quantize=True)
    head = find_output_head(model)
    assert head.matrix is not None
    assert head.matrix.quantized
    assert_same_loss_and_grads(full_and_selected(model))


def test_trained_head_keeps_autodiff():
    model = adapted_model(targets=("all-linear", "lm_head"))
    head = find_output_head(model)
    assert head.matrix is None
    results = full_and_selected(model)
    assert any(name.startswith("lm_head.") for name in results[1][1])
    assert_same_loss_and_grads(results)


def test_extra_logit_processing_rejects_split():
    class ScaledLogits(type(make_model())):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return 0.5 * super().__call__(inputs, cache, input_embeddings)

    model = make_model()
    model.__class__ = ScaledLogits
    assert find_output_head(model) is None
    assert find_output_head(make_model()) is not None


def test_select_targets_pads_with_zero_weight():
    _, targets, mask = batch()
    selection = select_targets(targets, mask)
    count = int(mask.sum())

    assert selection.positions.shape == (ROW_MULTIPLE,)
    positions = np.array(selection.positions)
    np.testing.assert_array_equal(positions[:count], np.flatnonzero(mask))
    np.testing.assert_array_equal(positions[count:], 0)
    np.testing.assert_array_equal(np.array(selection.weights)[:count], 1.0)
    np.testing.assert_array_equal(np.array(selection.weights)[count:], 0.0)
    np.testing.assert_array_equal(np.array(selection.targets)[:count], targets[mask > 0])


def test_select_targets_rounds_up_to_multiple():
    targets = np.zeros((2, 100), dtype=np.int32)
    mask = np.ones((2, 100), dtype=np.float32)
    assert select_targets(targets, mask, row_multiple=64).positions.shape == (256,)
    assert select_targets(targets, np.zeros_like(mask), row_multiple=64).positions.shape == (64,)


@pytest.mark.parametrize("tie", [False, True])
def test_selected_loss_sum_matches_full(tie):
    model = adapted_model(tie=tie)
    inputs, targets, mask = batch()
    selection = select_targets(targets, mask)
    total, count = selected_loss_sum(find_output_head(model), mx.array(inputs),
                                     selection.positions, selection.targets, selection.weights)
    expected = masked_loss(model, mx.array(inputs), mx.array(targets), mx.array(mask),
                           mx.array(1.0))
    assert abs(total.item() - expected.item()) < 1e-4
    assert count.item() == mask.sum()


def test_compiled_step_same_with_and_without_selection():
    inputs, targets, mask = (mx.array(x) for x in batch())
    normalizer = mask.sum().item()
    results = []
    for select in (True, False):
        model = adapted_model(tie=True)
        step = TrainStep(model, optim.Adam(learning_rate=1e-2), 1.0, select_logits=select)
        assert (step.head is not None) == select
        losses = []
        for _ in range(3):
            loss, _ = step([(inputs, targets, mask)], normalizer)
            mx.eval(loss, model.state)
            losses.append(loss.item())
        total, _ = step.loss_sum(inputs, targets, mask)
        results.append(losses + [total.item()])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_find_output_head_keeps_training_mode():
    model = adapted_model()
    model.train()
    find_output_head(model)
    assert model.training
    model.eval()
    find_output_head(model)
    assert not model.training


def test_tokens_per_step_weights_every_token_equally():
    inputs, targets, mask = (mx.array(x) for x in batch())
    step_tokens = mask.sum().item()
    constant = 3.0 * step_tokens
    results = []
    # Dividing by 3x the step's tokens scales the gradient by 1/3, which a 3x smaller
    # SGD learning rate reproduces; the reported loss stays the step's mean.
    for tokens_per_step, learning_rate in ((constant, 0.3), (None, 0.1)):
        model = adapted_model()
        step = TrainStep(model, optim.SGD(learning_rate=learning_rate), None,
                         tokens_per_step=tokens_per_step)
        loss, _ = step([(inputs, targets, mask)], step_tokens)
        mx.eval(loss, model.state)
        results.append((loss.item(), dict(tree_flatten(model.trainable_parameters()))))

    (weighted_loss, weighted_params), (mean_loss, mean_params) = results
    assert abs(weighted_loss - mean_loss) < 1e-5
    for name, value in mean_params.items():
        np.testing.assert_allclose(np.array(weighted_params[name]), np.array(value),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def test_tokens_per_step_must_be_positive():
    with pytest.raises(ValueError, match="tokens_per_step must be positive"):
        TrainStep(adapted_model(), optim.SGD(learning_rate=0.1), None, tokens_per_step=0.0)


def test_mean_targets_per_step_counts_examples():
    examples = [EncodedExample([1, 2, 3], [False, True, True], "a"),
                EncodedExample([1, 2, 3, 4, 5], [False, True, True, True, True], "b")]
    assert mean_targets_per_step(examples, batch_size=4) == 12.0
    assert mean_targets_per_step(examples, batch_size=4, grad_accumulation_steps=2) == 24.0
    with pytest.raises(ValueError, match="at least one example"):
        mean_targets_per_step([], batch_size=4)

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, resolve_targets
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import make_model


def adapted_model(seed=0):
    model = make_model(seed=seed)
    mx.random.seed(seed)
    attach_lora(model, resolve_targets(model, ["all-linear"]), r=4, lora_alpha=8.0)
    mx.eval(model.parameters())
    return model


def fixed_batch(rows=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(rows, length + 1))
    mask = np.ones((rows, length), dtype=np.float32)
    mask[:, :3] = 0
    mask[1, 8:] = 0
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


def test_loss_decreases_on_memorisation():
    model = adapted_model()
    step = TrainStep(model, optim.Adam(learning_rate=3e-3), max_grad_norm=1.0)
    batch = fixed_batch()
    normalizer = batch[2].sum().item()

    losses = []
    for _ in range(40):
        loss, _ = step([batch], normalizer)
        mx.eval(loss, model.state)
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_only_lora_parameters_change():
    model = adapted_model()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    step = TrainStep(model, optim.Adam(learning_rate=1e-2), max_grad_norm=None)
    batch = fixed_batch()
    for _ in range(3):
        loss, _ = step([batch], batch[2].sum().item())
        mx.eval(loss, model.state)

    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed
    assert all(k.endswith((".lora_A", ".lora_B")) for k in changed)
    base = [k for k in before if ".lora_" not in k]
    assert all(np.array_equal(before[k], after[k]) for k in base)


def test_accumulation_equals_full_batch():
    inputs, targets, mask = fixed_batch(rows=4)
    normalizer = mask.sum().item()

    full = adapted_model()
    full_step = TrainStep(full, optim.SGD(learning_rate=0.5), max_grad_norm=None)
    full_loss, _ = full_step([(inputs, targets, mask)], normalizer)
    mx.eval(full_loss, full.state)

    split = adapted_model()
    split_step = TrainStep(split, optim.SGD(learning_rate=0.5), max_grad_norm=None)
    halves = [(inputs[:2], targets[:2], mask[:2]), (inputs[2:], targets[2:], mask[2:])]
    split_loss, _ = split_step(halves, normalizer)
    mx.eval(split_loss, split.state)

    assert abs(full_loss.item() - split_loss.item()) < 1e-5
    full_params = dict(tree_flatten(full.trainable_parameters()))
    for name, value in tree_flatten(split.trainable_parameters()):
        np.testing.assert_allclose(np.array(value), np.array(full_params[name]), atol=1e-6)


def test_compiled_step_equals_eager():
    batch = fixed_batch()
    results = []
    for compile in (True, False):
        model = adapted_model()
        step = TrainStep(model, optim.Adam(learning_rate=1e-2), 1.0, compile=compile)
        losses = []
        for _ in range(3):
            loss, _ = step([batch], batch[2].sum().item())
            mx.eval(loss, model.state)
            losses.append(loss.item())
        results.append(losses)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_loss_matches_reference_cross_entropy():
    model = adapted_model()
    inputs, targets, mask = fixed_batch()
    step = TrainStep(model, optim.SGD(learning_rate=0.0), max_grad_norm=None)
    total, count = step.loss_sum(inputs, targets, mask)

    logits = np.array(model(inputs), dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.array(targets)[..., None], axis=-1)[..., 0]
    expected = -(picked * np.array(mask)).sum()
    assert abs(total.item() - expected) < 1e-3
    assert count.item() == np.array(mask).sum()

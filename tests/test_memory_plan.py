"""Memory plan: exact parameter and weight counts, the estimate's terms, and `mlxlora plan`."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxlora.attach import attach_lora, parameter_counts, resolve_targets
from mlxlora.batching import collate
from mlxlora.memory_plan import (
    LOGITS_COPIES,
    PlanSettings,
    base_bytes,
    batch_width,
    describe_model,
    describe_plan,
    estimate_method,
    lora_parameters,
    memory_limit,
    plan_memory,
    settings_from_config,
)
from mlxlora.config import TrainConfig
from mlxlora.prompt import EncodedExample, EncodedSplit, SplitSummary
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import make_model

TINY_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 260}

TARGET_CASES = [
    (["all-linear"], None, 8),
    (["attention"], None, 4),
    (["mlp"], 1, 16),
    (["q_proj", "v_proj"], None, 2),
    (["lm_head", "self_attn.o_proj"], 1, 8),
]


def quantize_divisible(model, bits: int, group_size: int) -> None:
    """Quantize like mlx_lm.convert: every layer whose rows split into whole groups."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % group_size == 0)


def settings(targets, r=8, batch=2, length=64, **extra) -> PlanSettings:
    return PlanSettings(batch_size=batch, sequence_length=length, r=r, targets=targets, **extra)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("target_modules,layers,r", TARGET_CASES)
def test_counts_equal_attached_model(target_modules, layers, r, quantized):
    model = make_model()
    if quantized:
        quantize_divisible(model, bits=4, group_size=32)
    targets = resolve_targets(model, target_modules, layers)
    layout = describe_model(model, TINY_CONFIG)

    attach_lora(model, targets, r, 16.0)
    total, trainable = parameter_counts(model)

    assert lora_parameters(layout, targets, r) == trainable
    assert layout.base_parameters + trainable == total
    assert describe_model(model, TINY_CONFIG).base_parameters == layout.base_parameters


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_loaded_base_bytes_exact(quantized):
    model = make_model()
    if quantized:
        quantize_divisible(model, bits=8, group_size=32)
    expected = sum(value.nbytes for _, value in tree_flatten(model.parameters()))

    layout = describe_model(model, TINY_CONFIG)

    assert layout.loaded_bytes == expected
    assert layout.loaded_quantized is quantized
    assert base_bytes(layout, "qlora" if quantized else "lora") == expected


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 64)])
def test_qlora_bytes_of_float_model(bits, group_size):
    float_layout = describe_model(make_model(), TINY_CONFIG)
    quantized = make_model()
    quantize_divisible(quantized, bits, group_size)
    expected = sum(value.nbytes for _, value in tree_flatten(quantized.parameters()))

    estimate = base_bytes(float_layout, "qlora", {"bits": bits, "group_size": group_size})

    assert estimate == expected


def test_lora_bytes_of_quantized_model():
    float_bytes = describe_model(make_model(), TINY_CONFIG).loaded_bytes
    quantized = make_model()
    quantize_divisible(quantized, bits=4, group_size=32)

    assert base_bytes(describe_model(quantized, TINY_CONFIG), "lora") == float_bytes


def test_qlora_counts_dequantized_copy_on_cpu(monkeypatch):
    quantized = make_model()
    quantize_divisible(quantized, bits=4, group_size=32)
    layout = describe_model(quantized, TINY_CONFIG)
    largest = max(m.out_features * m.in_features for m in layout.matrices)
    plan_settings = settings(resolve_targets(quantized, ["all-linear"]))

    monkeypatch.setattr("mlxlora.memory_plan.on_gpu", lambda: True)
    gpu = estimate_method(layout, plan_settings, "qlora")
    monkeypatch.setattr("mlxlora.memory_plan.on_gpu", lambda: False)
    cpu = estimate_method(layout, plan_settings, "qlora")
    lora = estimate_method(layout, plan_settings, "lora")

    assert gpu.dequantized_copies == 0
    assert cpu.dequantized_copies == 2 * largest * 4
    assert cpu.base_weights == gpu.base_weights == layout.loaded_bytes
    assert cpu.total == gpu.total + cpu.dequantized_copies
    assert lora.dequantized_copies == 0


@pytest.mark.parametrize("tokens", [2, 32, 33, 34, 65, 200])
def test_batch_width_matches_collate(tokens):
    example = EncodedExample(list(range(tokens)), [True] * tokens, "row")

    width = collate([example], pad_id=0).inputs.shape[1]

    assert batch_width(tokens, max_seq_length=4096) == width


def test_batch_width_caps_at_max_seq_length():
    assert batch_width(5000, max_seq_length=1024) == 1024


def test_estimate_terms():
    model = make_model()
    targets = resolve_targets(model, ["all-linear"])
    layout = describe_model(model, TINY_CONFIG)
    trainable = lora_parameters(layout, targets, 8)

    lora = estimate_method(layout, settings(targets), "lora")
    full = estimate_method(layout, settings(targets), "full")

    assert lora.logits == int(LOGITS_COPIES * 2 * 64 * 260 * 4)
    assert lora.lora_weights == trainable * 4
    assert lora.gradients == trainable * 4
    assert lora.optimizer_state == 2 * trainable * 4
    assert full.trainable_parameters == layout.base_parameters
    assert full.optimizer_state == 2 * layout.base_parameters * 4
    assert full.lora_weights == 0


def test_logits_follow_target_tokens():
    model = make_model()
    targets = resolve_targets(model, ["all-linear"])
    layout = describe_model(model, TINY_CONFIG)

    few = estimate_method(layout, settings(targets, batch=4, length=256, target_tokens=70), "lora")
    every = estimate_method(layout, settings(targets, batch=4, length=256), "lora")

    assert few.logits == int(LOGITS_COPIES * 128 * 260 * 4)
    assert every.logits == int(LOGITS_COPIES * 1024 * 260 * 4)


def test_batch_size_scales_target_tokens():
    options = settings([], batch=8, length=64, target_tokens=100)

    halved = options.with_batch_size(4)

    assert halved.batch_size == 4
    assert halved.target_tokens == 50
    assert options.with_batch_size(3).target_tokens == 38
    assert settings([], batch=8).with_batch_size(2).target_tokens is None


def test_settings_from_encoded_split():
    config = TrainConfig(batch_size=2, max_seq_length=100)
    examples = [EncodedExample(list(range(n)), [False] * (n - t) + [True] * t, f"row{n}")
                for n, t in ((10, 3), (40, 20), (50, 5), (130, 60))]
    split = EncodedSplit(examples, SplitSummary(4, 100, 150, [], [], [], []))

    options = settings_from_config(config, ["a"], split)

    assert options.sequence_length == 128
    assert options.target_tokens == 65
    assert settings_from_config(config, ["a"]).sequence_length == 128
    assert settings_from_config(config, ["a"]).target_tokens is None


def test_activations_shrink_with_options():
    model = make_model(layers=4)
    everything = resolve_targets(model, ["all-linear"])
    last_block = resolve_targets(model, ["all-linear"], layers=1)
    layout = describe_model(model, TINY_CONFIG)

    def activations(**options):
        merged = {"targets": everything, "batch": 4, "length": 256, **options}
        return estimate_method(layout, settings(**merged), "lora").activations

    assert activations(grad_checkpoint=True) < activations()
    assert activations(targets=last_block) < activations()
    assert activations(batch=2) < activations()
    assert activations(lora_dropout=0.1) > activations()


def test_plan_fits_and_suggestions():
    model = make_model(layers=4)
    targets = resolve_targets(model, ["all-linear"])
    layout = describe_model(model, TINY_CONFIG)
    options = settings(targets, batch=8, length=512)

    roomy = plan_memory(layout, options, "lora", limit=(10**12, "test"))
    needed = roomy.estimate.total
    tight = plan_memory(layout, options, "lora", limit=(int(needed * 0.7), "test"))

    assert roomy.fits()
    assert roomy.suggestions == []
    assert not tight.fits()
    assert any(s.startswith("--batch-size 4 --grad-accumulation-steps 2") for s in tight.suggestions)
    assert all("no single change" not in s for s in tight.suggestions)


def test_describe_plan_table():
    model = make_model()
    targets = resolve_targets(model, ["all-linear"])
    plan = plan_memory(describe_model(model, TINY_CONFIG), settings(targets), "lora",
                       limit=(10**12, "test"))

    lines = describe_plan(plan)

    assert lines[1].split() == ["LoRA", "*", "QLoRA", "full", "FT"]
    assert lines[-2].split() == ["fits", "yes", "yes", "yes"]
    assert "Limit: 1000.00 GB (test)" in lines[-1]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_describe_plan_dequantized_copies_row(gpu, monkeypatch):
    monkeypatch.setattr("mlxlora.memory_plan.on_gpu", lambda: gpu)
    model = make_model()
    targets = resolve_targets(model, ["all-linear"])
    plan = plan_memory(describe_model(model, TINY_CONFIG), settings(targets), "lora",
                       limit=(10**12, "test"))

    rows = [line.split() for line in describe_plan(plan) if "dequantized copies" in line]

    if gpu:
        assert rows == []
    else:
        assert len(rows) == 1
        assert rows[0][2] == "-"
        assert rows[0][3] != "-"
        assert rows[0][-1] == "-"


def test_memory_limit_on_cpu():
    limit, source = memory_limit()

    assert limit > 0
    if not mx.metal.is_available():
        assert source == "RAM"


def test_estimate_close_to_measured_peak():
    # The calibration target is 25%; this tiny run is compiled-free to stay fast.
    model = make_model(hidden_size=64, layers=4)
    config = {**TINY_CONFIG, "hidden_size": 64, "intermediate_size": 128}
    targets = resolve_targets(model, ["all-linear"])
    attach_lora(model, targets, 8, 16.0)
    model.train()
    mx.eval(model.parameters())
    estimate = estimate_method(describe_model(model, config), settings(targets, batch=4, length=256),
                               "lora")

    optimizer = optim.AdamW(learning_rate=1e-5)
    step = TrainStep(model, optimizer, max_grad_norm=1.0, compile=False)
    tokens = mx.random.randint(0, 260, (4, 257))
    mask = mx.ones((4, 256))
    mx.eval(tokens, mask)
    mx.reset_peak_memory()
    for _ in range(2):
        loss, norm = step([(tokens[:, :-1], tokens[:, 1:], mask)], 1024.0)
        mx.eval(loss, norm, model.state, optimizer.state)
    measured = mx.get_peak_memory()

    assert abs(estimate.total - measured) / measured < 0.25


def test_plan_cli_stories(shared_data):
    from mlxlora.commands.plan import command
    from mlxlora.loading import load_model

    model_path = str(shared_data / "models" / "stories260K.gguf")
    result = CliRunner().invoke(command, ["--model", model_path, "--rank", "4", "--json",
                                          "--target-modules", "attention", "--layers", "2"])
    plan = json.loads(result.output)

    model = load_model(model_path).model
    attach_lora(model, resolve_targets(model, ["attention"], 2), 4, 8.0)
    total, trainable = parameter_counts(model)
    assert plan["total_parameters"] == total
    assert plan["estimates"]["lora"]["trainable_parameters"] == trainable
    assert plan["selected"] == "lora"
    assert plan["settings"]["sequence_length"] == 2048


def test_plan_cli_text_with_data(shared_data):
    from mlxlora.commands.plan import command

    result = CliRunner().invoke(command, ["--model", str(shared_data / "models" / "stories260K.gguf"),
                                          "--data", str(shared_data / "wikisql"),
                                          "--max-seq-length", "512"])

    assert result.exit_code == 0, result.output
    assert "batch 4 x 512 tokens" in result.output
    assert "fits" in result.output

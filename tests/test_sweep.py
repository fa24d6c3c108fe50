"""`mlxlora sweep`: grid parsing, equal examples, divergence, resume, report, plot, warnings."""

import dataclasses
import json
import logging
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner
from mlx_lm.utils import save_config, save_model

from mlxlora.batching import collate
from mlxlora.commands.sweep import command as sweep_command
from mlxlora.config import TrainConfig, resolve_config
from mlxlora.data_formats import Example
from mlxlora.errors import ConfigError, DataError
from mlxlora.hyperparams import hyperparameter_warnings, rule_learning_rate
from mlxlora.loading import LoadedModel
from mlxlora.loss import masked_loss
from mlxlora.prompt import encode_split
from mlxlora.session import prepare_session
from mlxlora.sweep import SweepOptions, hold_out, report_lines, run_sweep
from mlxlora.sweep_grid import (DEFAULT_STEPS, GridPoint, build_grid, default_learning_rates,
                                examples_budget, parse_integers, parse_learning_rates)
from mlxlora.sweep_plot import plot_sweep
from mlxlora.sweep_report import format_table, recommend, train_command
from mlxlora.sweep_runner import (DIVERGED, OK, DivergenceCheck, EvalSet, ExampleStream,
                                  SweepRunner, evaluation_steps)
from mlxlora.testing.tiny import make_model, make_tokenizer

PAD_ID = 259


# Fixtures and helpers.

def sum_example(index: int) -> Example:
    a, b = index % 7, (3 * index) % 5
    messages = [{"role": "user", "content": f"{a}+{b}"},
                {"role": "assistant", "content": str(a + b)}]
    return Example(f"train.jsonl:{index + 1}", "chat", messages, None, {"messages": messages})


def encoded_examples(count: int, start: int = 0) -> list:
    examples = [sum_example(i) for i in range(start, start + count)]
    return encode_split(examples, make_tokenizer(), TrainConfig()).examples


def loaded_tiny(model=None) -> LoadedModel:
    return LoadedModel(model=model or make_model(), tokenizer=make_tokenizer(),
                       model_id="tiny", model_path=Path("tiny"),
                       config={"model_type": "llama", "hidden_size": 32}, quantized=False,
                       dtype="float32")


def make_runner(config=None, budget=8, model=None, train_count=16, evals=1) -> SweepRunner:
    config = config or TrainConfig(seed=0)
    eval_set = EvalSet(encoded_examples(8, start=100), 4, -1, PAD_ID)
    return SweepRunner(config, loaded_tiny(model), encoded_examples(train_count), eval_set,
                       budget, evals)


def save_tiny_folder(folder: Path) -> Path:
    model = make_model()
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    save_model(folder, model)
    save_config(config, folder / "config.json")
    make_tokenizer()._tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps(e.raw) + "\n" for e in examples), encoding="utf-8")


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny model folder and a data folder with train.jsonl and valid.jsonl."""
    model = save_tiny_folder(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [sum_example(i) for i in range(16)])
    write_jsonl(data / "valid.jsonl", [sum_example(i) for i in range(100, 106)])
    return model, data


def resolved_for(model: Path, data: Path, **flags):
    return resolve_config(None, {"model": str(model), "data": str(data), **flags})


# Grid parsing.

def test_lr_range_is_log_spaced():
    assert parse_learning_rates("1e-5:1e-2:4") == [1e-5, 1e-4, 1e-3, 1e-2]


def test_lr_range_keeps_both_ends():
    values = parse_learning_rates("1e-4:1e-2:5")
    assert len(values) == 5
    assert values[0] == 1e-4
    assert values[-1] == 1e-2
    assert values[2] == 1e-3


def test_lr_list_sorted_and_distinct():
    assert parse_learning_rates("3e-4, 1e-4,3e-4,1e-3") == [1e-4, 3e-4, 1e-3]


@pytest.mark.parametrize("text, fragment", [
    ("abc", "'abc' is not a number"),
    ("1e-4,-1e-3", "'-1e-3' must be a positive number"),
    ("0", "'0' must be a positive number"),
    ("1e-2:1e-5:3", "STOP must be larger than START"),
    ("1e-5:1e-2:1", "COUNT must be at least 2"),
    ("1e-5:1e-2:x", "COUNT 'x' is not a whole number"),
    ("1e-5:1e-2", "a range is START:STOP:COUNT"),
    ("nan", "must be a positive number"),
])
def test_lr_parse_errors(text, fragment):
    with pytest.raises(ConfigError) as error:
        parse_learning_rates(text)
    assert fragment in str(error.value)
    assert "--lrs" in str(error.value)


def test_lr_parse_reports_every_problem():
    with pytest.raises(ConfigError) as error:
        parse_learning_rates("x,1e-3,-2")
    assert len(error.value.problems) == 2


def test_integers_parse_sorted_distinct():
    assert parse_integers("16, 1,4,4", "--batch-sizes") == [1, 4, 16]


@pytest.mark.parametrize("text, fragment", [
    ("0", "0 must be at least 1"),
    ("2,x", "'x' is not a whole number"),
    ("2.5", "'2.5' is not a whole number"),
])
def test_integers_parse_errors(text, fragment):
    with pytest.raises(ConfigError) as error:
        parse_integers(text, "--ranks")
    assert fragment in str(error.value)
    assert "--ranks" in str(error.value)


def test_default_lrs_centred_on_rule():
    values = default_learning_rates(1.3e-3)
    assert values == [1.3e-4, pytest.approx(4.11096e-4), 1.3e-3, pytest.approx(4.11096e-3),
                      1.3e-2]


def test_build_grid_orders_by_rank():
    grid = build_grid([1e-3, 1e-2], [2, 8], [16, 4])
    assert len(grid) == 8
    assert [p.rank for p in grid] == [16] * 4 + [4] * 4
    assert grid[0] == GridPoint(1e-3, 2, 16)
    assert grid[1] == GridPoint(1e-2, 2, 16)


def test_grid_point_key_stable():
    assert GridPoint(3e-4, 4, 8).key == "lr=0.0003,batch_size=4,rank=8"
    assert GridPoint(0.1 + 0.2, 4, 8).key == GridPoint(0.3, 4, 8).key


# The examples budget.

def test_budget_from_steps_at_smallest_batch():
    assert examples_budget([2, 16], steps=80) == 160


def test_budget_default_steps():
    assert examples_budget([4]) == DEFAULT_STEPS * 4


def test_budget_rounds_up_to_common_multiple():
    assert examples_budget([3, 16], examples=100) == 144


def test_budget_rejects_far_off_multiple():
    with pytest.raises(ConfigError) as error:
        examples_budget([7, 13], examples=10)
    assert "multiple of 91" in str(error.value)


def test_budget_rejects_steps_and_examples():
    with pytest.raises(ConfigError) as error:
        examples_budget([2], steps=5, examples=10)
    assert "pass only one" in str(error.value)


@pytest.mark.parametrize("steps, examples, fragment", [
    (0, None, "--steps must be at least 1"),
    (None, 0, "--examples must be at least 1"),
])
def test_budget_rejects_non_positive(steps, examples, fragment):
    with pytest.raises(ConfigError) as error:
        examples_budget([2], steps=steps, examples=examples)
    assert fragment in str(error.value)


def test_evaluation_steps_end_at_total():
    assert evaluation_steps(10, 1) == [10]
    assert evaluation_steps(10, 4) == [2, 5, 8, 10]
    assert evaluation_steps(3, 10) == [1, 2, 3]


# Equal examples seen.

def test_stream_same_examples_across_batch_sizes():
    stream = ExampleStream(10, seed=3)
    by_one = [i for step in range(24) for i in stream.take(step, 1)]
    by_eight = [i for step in range(3) for i in stream.take(step * 8, 8)]
    assert by_one == by_eight
    assert sorted(by_one[:10]) == list(range(10))
    assert sorted(by_one[10:20]) == list(range(10))
    assert by_one[:10] != by_one[10:20]


def test_step_batches_cover_same_examples():
    runner = make_runner()
    seen = {}
    for batch_size in (2, 8):
        rows = []
        for step in range(16 // batch_size):
            micro_batches, normalizer = runner.step_batches(step, batch_size)
            inputs = micro_batches[0][0]
            assert inputs.shape[0] == batch_size
            assert normalizer == int(micro_batches[0][2].sum().item())
            rows.extend(tuple(row) for row in inputs.tolist())
        seen[batch_size] = sorted(rows)
    assert seen[2] == seen[8]


def test_points_see_equal_examples():
    runner = make_runner(budget=16)
    start = runner.start_loss(rank=4)
    results = [runner.run(GridPoint(1e-3, batch_size, 4), start) for batch_size in (2, 8)]
    assert [r.examples_seen for r in results] == [16, 16]
    assert [r.steps for r in results] == [8, 2]
    assert [len(r.train_losses) for r in results] == [8, 2]
    assert all(r.status == OK for r in results)


def test_accumulation_counts_in_examples():
    runner = make_runner(config=TrainConfig(grad_accumulation_steps=2), budget=16)
    start = runner.start_loss(rank=4)
    result = runner.run(GridPoint(1e-3, 2, 4), start)
    assert result.steps == 4
    assert result.examples_seen == 16


# Same initial adapter, ranks and memory.

def test_initial_adapter_restored_between_points():
    runner = make_runner()
    start = runner.start_loss(rank=4)
    first = runner.run(GridPoint(3e-3, 2, 4), start)
    runner.run(GridPoint(3e-2, 4, 4), start)
    again = runner.run(GridPoint(3e-3, 2, 4), start)
    assert again.train_losses == first.train_losses
    assert again.val_loss == first.val_loss
    assert runner.start_loss(rank=4) == start


def test_rank_change_reattaches_adapter():
    runner = make_runner()
    start = runner.start_loss(rank=2)
    first = runner.run(GridPoint(3e-3, 2, 2), start)
    shapes = {tuple(v.shape) for k, v in runner.initial if k.endswith("lora_A")}
    assert {s[0] for s in shapes} == {2}

    runner.run(GridPoint(3e-3, 2, 6), start)
    shapes = {tuple(v.shape) for k, v in runner.initial if k.endswith("lora_A")}
    assert {s[0] for s in shapes} == {6}
    nested = [name for name, module in runner.model.named_modules()
              if name.endswith(".base.base")]
    assert nested == []

    again = runner.run(GridPoint(3e-3, 2, 2), start)
    assert again.val_loss == first.val_loss


def test_memory_flat_across_points():
    runner = make_runner()
    start = runner.start_loss(rank=4)
    results = [runner.run(GridPoint(lr, 2, 4), start) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    memory = [r.active_memory_mb for r in results]
    assert max(memory) - memory[0] < 0.5
    assert all(r.peak_memory_mb > 0 for r in results)


# Divergence.

def test_divergence_check_nan_loss():
    check = DivergenceCheck(start_loss=2.0)
    assert check.update(1, 2.1, 1.0) is None
    reason = check.update(2, float("nan"), 1.0)
    assert "loss nan" in reason
    assert "step 2" in reason


def test_divergence_check_waits_for_window():
    check = DivergenceCheck(start_loss=1.0)
    assert check.threshold == 2.0
    assert check.update(1, 9.0, 1.0) is None
    assert check.update(2, 9.0, 1.0) is None
    assert "above 2.000" in check.update(3, 9.0, 1.0)


def test_divergence_check_mean_below_threshold():
    check = DivergenceCheck(start_loss=3.0)
    assert check.threshold == 6.0
    for step, loss in enumerate([3.0, 7.0, 3.0, 3.0, 3.0], start=1):
        assert check.update(step, loss, 1.0) is None


def test_divergence_check_final_val_loss():
    check = DivergenceCheck(start_loss=1.0)
    assert check.check_final(1.5) is None
    assert "above 2.000" in check.check_final(2.5)
    assert "inf" in check.check_final(float("inf"))


def test_forced_high_lr_stops_on_nan():
    runner = make_runner(budget=16)
    start = runner.start_loss(rank=4)
    result = runner.run(GridPoint(1e30, 2, 4), start)
    assert result.status == DIVERGED
    assert result.steps < 8
    assert result.val_loss is None
    assert "nan" in result.reason or "inf" in result.reason
    assert None in result.train_losses
    json.dumps(result.to_dict(), allow_nan=False)


def pretrained_tiny() -> nn.Module:
    """Return a tiny model whose base weights already fit the sum examples (loss near 1)."""
    model = make_model()
    examples = encoded_examples(24)
    batch = collate(examples, PAD_ID)
    arrays = [mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)]
    normalizer = mx.array(float(batch.num_targets))
    optimizer = optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    for _ in range(40):
        _, grads = loss_and_grad(model, *arrays, normalizer)
        optimizer.update(model, grads)
        mx.eval(model.state, optimizer.state)
    return model


@pytest.mark.slow
def test_forced_high_lr_stops_above_start():
    runner = make_runner(model=pretrained_tiny(), budget=32,
                         config=TrainConfig(max_grad_norm=None, lr_schedule="constant",
                                            warmup_steps=0))
    start = runner.start_loss(rank=4)
    assert start < 2.0
    result = runner.run(GridPoint(10.0, 2, 4), start)
    assert result.status == DIVERGED
    assert "above" in result.reason
    assert result.steps < 16
    healthy = runner.run(GridPoint(1e-3, 2, 4), start)
    assert healthy.status == OK


# Recommendation and table on a known synthetic result.

def synthetic_point(lr, batch_size, val_loss, rank=8, status=OK, steps=10):
    return {"key": GridPoint(lr, batch_size, rank).key, "learning_rate": lr,
            "batch_size": batch_size, "rank": rank, "steps": steps,
            "examples_seen": 160 if status == OK else steps * batch_size, "status": status,
            "val_loss": val_loss if status == OK else None, "reason": None, "seconds": 1.0,
            "peak_memory_mb": 1.0, "active_memory_mb": 1.0,
            "train_losses": [2.0 - 0.01 * i for i in range(160 // batch_size if status == OK
                                                          else steps)],
            "val_curve": [[160, val_loss]] if status == OK else []}


SYNTHETIC = [
    synthetic_point(1e-4, 2, 1.50), synthetic_point(3e-4, 2, 1.20),
    synthetic_point(1e-3, 2, 1.00), synthetic_point(3e-3, 2, 1.01),
    synthetic_point(1e-2, 2, None, status=DIVERGED, steps=4),
    synthetic_point(1e-4, 16, 1.80), synthetic_point(3e-4, 16, 1.50),
    synthetic_point(1e-3, 16, 1.30), synthetic_point(3e-3, 16, 1.25),
    synthetic_point(1e-2, 16, 1.40),
]


def test_recommend_picks_minimum():
    recommendation = recommend(SYNTHETIC, 2.0, None, {})
    assert recommendation.learning_rate == 1e-3
    assert recommendation.batch_size == 2
    assert recommendation.val_loss == 1.00
    assert recommendation.lower_change == pytest.approx(0.20)
    assert recommendation.higher_change == pytest.approx(0.01)
    assert recommendation.near_best == (1e-3, 3e-3)
    assert recommendation.edge is None
    assert recommendation.next_range is None


def test_recommend_flags_high_edge():
    points = [synthetic_point(1e-4, 4, 1.5), synthetic_point(1e-3, 4, 1.2),
              synthetic_point(1e-2, 4, 1.1)]
    recommendation = recommend(points, 2.0, None, {})
    assert recommendation.learning_rate == 1e-2
    assert recommendation.edge == "high"
    assert recommendation.next_range == "0.001:0.1:3"
    assert recommendation.higher_change is None


def test_recommend_flags_low_edge():
    points = [synthetic_point(1e-4, 4, 1.0), synthetic_point(3e-4, 4, 1.2),
              synthetic_point(1e-3, 4, 1.4), synthetic_point(3e-3, 4, 1.9)]
    recommendation = recommend(points, 2.0, None, {})
    assert recommendation.edge == "low"
    assert recommendation.next_range == "1.11e-05:0.0003:4"


def test_recommend_none_when_all_diverged():
    points = [synthetic_point(1e-2, 4, None, status=DIVERGED, steps=2)]
    assert recommend(points, 2.0, None, {}) is None
    result = {"points": points, "start_val_loss": 2.0, "recommendation": None}
    assert "Every grid point diverged" in report_lines(result)[-1]


def test_train_command_keeps_flags_and_sets_best():
    best = synthetic_point(1.3e-3, 4, 1.0, rank=16)
    flags = {"model": "my model", "data": "data/x", "lora_alpha": 32.0, "learning_rate": 1e-5,
             "batch_size": 64, "r": 8, "train_on_prompt": True, "grad_checkpoint": False,
             "target_modules": ["q_proj", "v_proj"]}
    command = train_command("recipes/q.yaml", flags, best)
    assert command == ("mlxlora train --recipe recipes/q.yaml --model 'my model' --data data/x "
                       "--lora-alpha 32.0 --train-on-prompt --no-grad-checkpoint "
                       "--target-modules q_proj,v_proj --learning-rate 0.0013 --batch-size 4 "
                       "--rank 16")


def test_table_marks_best_and_diverged():
    best_key = GridPoint(1e-3, 2, 8).key
    table = format_table(SYNTHETIC, 2.0, best_key)
    assert table.splitlines() == [
        "Validation loss after 160 training examples per point (start: 2.0000):",
        "",
        "rank 8: lr     batch 2  batch 16",
        "    0.0001      1.5000    1.8000",
        "    0.0003      1.2000    1.5000",
        "     0.001     1.0000*    1.3000",
        "     0.003      1.0100    1.2500",
        "      0.01  diverged@4    1.4000",
    ]


def test_report_lines_describe_optimum():
    recommendation = recommend(SYNTHETIC, 2.0, None, {"model": "m"})
    result = {"points": SYNTHETIC, "start_val_loss": 2.0,
              "recommendation": recommendation.to_dict()}
    text = "\n".join(report_lines(result))
    assert "Best: learning rate 0.001, batch size 2, rank 8: validation loss 1.0000" in text
    assert "Flat optimum: learning rates from 0.001 to 0.003 (3.0x)" in text
    assert "the next lower rate is +20.0% and the next higher rate is +1.0%" in text
    assert "Next: mlxlora train --model m --learning-rate 0.001 --batch-size 2 --rank 8" in text
    assert "edge" not in text


# Plot.

def test_plot_file_written(tmp_path):
    result = {"settings": {"config": {"model": "tiny"}}, "start_val_loss": 2.0,
              "points": SYNTHETIC,
              "recommendation": recommend(SYNTHETIC, 2.0, None, {}).to_dict()}
    path = plot_sweep(result, tmp_path / "sweep.png")
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(content) > 10_000


def test_plot_without_finished_points(tmp_path):
    points = [synthetic_point(1e-2, 4, None, status=DIVERGED, steps=2)]
    result = {"settings": {"config": {}}, "start_val_loss": 2.0, "points": points,
              "recommendation": None}
    assert plot_sweep(result, tmp_path / "sweep.png").stat().st_size > 0


# Whole sweeps: files, resume, held-out data, CLI.

class SimulatedInterrupt(Exception):
    """Stands in for Ctrl-C, which pytest would treat as a request to stop the session."""


@pytest.mark.slow
def test_resume_after_interrupt(tiny_setup, tmp_path, monkeypatch):
    model, data = tiny_setup
    resolved = resolved_for(model, data)
    grid = {"learning_rates": [1e-3, 1e-2, 1e-1], "batch_sizes": [2], "examples": 8}
    reference = run_sweep(resolved, SweepOptions(output=tmp_path / "full", **grid))

    calls, interrupt_at = [], [2]
    original = SweepRunner.run

    def interrupt_second(self, point, start_loss):
        calls.append(point.key)
        if len(calls) in interrupt_at:
            raise SimulatedInterrupt
        return original(self, point, start_loss)

    monkeypatch.setattr(SweepRunner, "run", interrupt_second)
    options = SweepOptions(output=tmp_path / "resumed", **grid)
    with pytest.raises(SimulatedInterrupt):
        run_sweep(resolved, options)
    stored = json.loads((tmp_path / "resumed" / "sweep.json").read_text())
    assert [p["learning_rate"] for p in stored["points"]] == [1e-3]

    calls.clear()
    interrupt_at.clear()
    resumed = run_sweep(resolved, options)
    assert calls == [GridPoint(1e-2, 2, 8).key, GridPoint(1e-1, 2, 8).key]
    assert [p["val_loss"] for p in resumed["points"]] == \
        [p["val_loss"] for p in reference["points"]]
    assert resumed["recommendation"] == reference["recommendation"]
    assert (tmp_path / "resumed" / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_rejects_changed_settings(tiny_setup, tmp_path):
    model, data = tiny_setup
    options = SweepOptions(output=tmp_path / "out", learning_rates=[1e-3], batch_sizes=[2],
                           examples=4)
    run_sweep(resolved_for(model, data), options)

    with pytest.raises(ConfigError) as error:
        run_sweep(resolved_for(model, data, lora_alpha=4.0), options)
    assert "lora_alpha: 16.0 then, 4.0 now" in str(error.value)
    assert "--overwrite" in str(error.value)

    options.overwrite = True
    result = run_sweep(resolved_for(model, data, lora_alpha=4.0), options)
    assert len(result["points"]) == 1
    assert result["settings"]["config"]["lora_alpha"] == 4.0


@pytest.mark.slow
def test_held_out_slice_without_valid(tiny_setup, tmp_path):
    model, data = tiny_setup
    (data / "valid.jsonl").unlink()
    options = SweepOptions(output=tmp_path / "out", learning_rates=[1e-3], batch_sizes=[2],
                           examples=4)
    result = run_sweep(resolved_for(model, data), options)
    assert result["valid_source"] == "held-out slice of train (1 examples)"
    assert result["valid_examples_scored"] == 1


def test_hold_out_is_seeded_and_disjoint():
    examples = list(range(30))
    train, held_out = hold_out(examples, seed=5)
    assert len(held_out) == 3
    assert sorted(train + held_out) == examples
    assert hold_out(examples, seed=5) == (train, held_out)
    assert hold_out(examples, seed=6)[1] != held_out


def test_hold_out_needs_two_examples():
    with pytest.raises(DataError) as error:
        hold_out([1], seed=0)
    assert "valid.jsonl" in str(error.value)


@pytest.mark.slow
def test_cli_sweep_writes_outputs(tiny_setup, tmp_path):
    model, data = tiny_setup
    output = tmp_path / "out"
    result = CliRunner().invoke(sweep_command, [
        "--model", str(model), "--data", str(data), "--lrs", "1e-3,1e-2",
        "--batch-sizes", "2,4", "--examples", "8", "--evals", "2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "rank 8: lr  batch 2  batch 4" in result.output
    assert "Next: mlxlora train --model" in result.output
    assert "--data " + str(data) in result.output

    stored = json.loads((output / "sweep.json").read_text())
    assert len(stored["points"]) == 4
    assert all(len(p["val_curve"]) == 2 for p in stored["points"])
    assert stored["recommendation"]["key"] in {p["key"] for p in stored["points"]}
    assert (output / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_grid(tiny_setup, tmp_path):
    model, data = tiny_setup
    result = CliRunner().invoke(sweep_command, [
        "--model", str(model), "--data", str(data), "--lrs", "1e-3:1e-4:3",
        "--output", str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError)
    assert "STOP must be larger than START" in str(result.exception)
    assert not (tmp_path / "out").exists()


# Warnings of `mlxlora train` that point to the sweep.

def test_low_lr_warning_names_sweep():
    rule = rule_learning_rate("llama", 576).value
    warnings = hyperparameter_warnings(rule / 10, 8, "llama", 576)
    assert len(warnings) == 1
    assert "10x below the LoRA rule" in warnings[0]
    assert "full fine-tuning rate" in warnings[0]
    assert "mlxlora sweep" in warnings[0]


def test_large_batch_warning_names_sweep():
    rule = rule_learning_rate("llama", 576).value
    warnings = hyperparameter_warnings(rule, 128, "llama", 576)
    assert len(warnings) == 1
    assert "effective batch size 128" in warnings[0]
    assert "larger rank does not fix it" in warnings[0]
    assert "mlxlora sweep --batch-sizes" in warnings[0]


def test_no_warning_at_rule_and_small_batch():
    rule = rule_learning_rate("llama", 576).value
    assert hyperparameter_warnings(rule, 64, "llama", 576) == []
    assert hyperparameter_warnings(rule / 3.9, 8, "llama", 576) == []


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_train_session_logs_warnings(tiny_setup, tmp_path):
    model, data = tiny_setup
    resolved = resolved_for(model, data, learning_rate=1e-5, batch_size=16,
                            grad_accumulation_steps=8)
    handler = ListHandler()
    logger = logging.getLogger("mlxlora")
    logger.addHandler(handler)
    try:
        prepare_session(resolved, tmp_path / "run")
    finally:
        logger.removeHandler(handler)
    assert any("looks like a full fine-tuning rate" in m for m in handler.messages)
    assert any("effective batch size 128" in m for m in handler.messages)

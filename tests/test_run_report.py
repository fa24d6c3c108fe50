"""The run report (report.md, loss.png), its warnings, `mlxlora report`, and the metric sinks."""

import importlib
import json
import logging
import math
import sys
import types

import pytest
from click.testing import CliRunner

from mlxlora.attach import parameter_counts
from mlxlora.commands.report import command as report_command
from mlxlora.report_markdown import base_weights_text
from mlxlora.config import resolve_config
from mlxlora.errors import ConfigError
from mlxlora.loading import LoadedModel
from mlxlora.metric_sinks import MetricFanout, check_report_to, open_metric_sinks
from mlxlora.report_log import MetricsWriter
from mlxlora.report_checks import find_warnings
from mlxlora.run_facts import Run, learning_rate_curve, load_run, read_metrics
from mlxlora.run_report import write_report
from mlxlora.schedule import build_schedule
from mlxlora.testing.tiny import make_model, make_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_record(step, loss, tokens=20_000, lr=1e-3):
    return {"step": step, "train_loss": loss, "lr": lr, "tokens_per_second": 100.0 + step,
            "trained_tokens": tokens, "peak_memory_gb": 1.5}


def val_record(step, loss):
    return {"step": step, "val_loss": loss, "val_perplexity": math.exp(loss)}


def summary(**changes):
    content = {"model_type": "llama", "hidden_size": 576, "quantized_base": False,
               "dtype": "float32", "parameters": {"total": 1_100_000, "trainable": 100_000},
               "lora_modules": 14, "rule_learning_rate": 1.32e-3, "effective_batch": 8,
               "processes": 1, "batches_per_epoch": 10, "memory_plan_gb": 2.0,
               "data": {"train": split_facts(), "valid": split_facts()},
               "data_check_warnings": []}
    content.update(changes)
    return content


def split_facts(**changes):
    facts = {"examples": 80, "examples_read": 80, "tokens": 8000, "target_tokens": 2000,
             "longest": 120, "max_seq_length": 256, "long": 0, "lost_targets": 0,
             "dropped": 0, "untrainable": 0, "notes": []}
    facts.update(changes)
    return facts


def make_run(tmp_path, train=None, val=None, learning_rate=1.32e-3, **summary_changes):
    train = train if train is not None else [train_record(10, 2.0), train_record(20, 1.0)]
    val = val if val is not None else [val_record(0, 2.5), val_record(20, 1.1)]
    config = {"model": "tiny", "data": "data", "r": 8, "lora_alpha": 16.0,
              "lora_dropout": 0.0, "use_rslora": False, "target_modules": ["all-linear"],
              "batch_size": 8, "grad_accumulation_steps": 1, "lr_schedule": "cosine",
              "warmup_steps": None, "min_lr_ratio": 0.1, "learning_rate": None,
              "full_ft_lr": None, "train_on_prompt": False}
    return Run(tmp_path, train, val, config=config, sources={"r": "recipe r.yaml"},
               learning_rate=learning_rate, total_steps=20, summary=summary(**summary_changes))


def save_run(run: Run) -> None:
    records = sorted(run.train + run.val, key=lambda r: r["step"])
    (run.folder / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run.folder / "training_config.json").write_text(json.dumps(
        {"config": run.config, "sources": run.sources, "learning_rate_used": run.learning_rate,
         "total_steps": run.total_steps}), encoding="utf-8")
    (run.folder / "run_summary.json").write_text(json.dumps(run.summary), encoding="utf-8")


def warning_containing(warnings, text):
    return [w for w in warnings if text in w]


# --- reading -------------------------------------------------------------------------------


def test_read_metrics_later_record_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [val_record(0, 3.0), train_record(10, 2.0), train_record(10, 1.5),
             val_record(10, 1.4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2', encoding="utf-8")

    train, val = read_metrics(path)

    assert [r["train_loss"] for r in train] == [1.5]
    assert [(r["step"], r["val_loss"]) for r in val] == [(0, 3.0), (10, 1.4)]


def test_load_run_missing_folder(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_run(tmp_path / "absent")

    assert "folder not found" in str(caught.value)


def test_load_run_without_metrics(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_run(tmp_path)

    assert "metrics.jsonl not found" in str(caught.value)


def test_load_run_roundtrip(tmp_path):
    run = make_run(tmp_path)
    save_run(run)

    loaded = load_run(tmp_path)

    assert loaded.train == run.train
    assert loaded.val == run.val
    assert loaded.learning_rate == run.learning_rate
    assert loaded.summary == run.summary


# --- warnings ------------------------------------------------------------------------------


def test_healthy_run_has_no_warnings(tmp_path):
    assert find_warnings(make_run(tmp_path)) == []


def test_warning_full_ft_learning_rate(tmp_path):
    warnings = find_warnings(make_run(tmp_path, learning_rate=2e-5))

    assert len(warning_containing(warnings, "looks like a full fine-tuning rate")) == 1


def test_warning_large_batch(tmp_path):
    warnings = find_warnings(make_run(tmp_path, effective_batch=128))

    assert len(warning_containing(warnings, "effective batch size 128")) == 1


def test_warning_rising_validation_loss(tmp_path):
    val = [val_record(0, 2.5), val_record(10, 1.0), val_record(20, 1.2)]

    warnings = find_warnings(make_run(tmp_path, val=val))

    assert warning_containing(warnings, "rose from 1.0000 (step 10) to 1.2000 (step 20)")


def test_warning_validation_never_improved(tmp_path):
    val = [val_record(0, 2.5), val_record(10, 3.0), val_record(20, 3.5)]

    warnings = find_warnings(make_run(tmp_path, val=val))

    assert warning_containing(warnings, "never fell below its value before training (2.5000)")
    assert warning_containing(warnings, "overfitting") == []


def test_no_overfitting_warning_within_margin(tmp_path):
    val = [val_record(0, 2.5), val_record(10, 1.0), val_record(20, 1.01)]

    assert find_warnings(make_run(tmp_path, val=val)) == []


def test_warning_training_loss_flat(tmp_path):
    train = [train_record(10, 1.0), train_record(20, 1.2)]

    warnings = find_warnings(make_run(tmp_path, train=train))

    assert warning_containing(warnings, "Training loss did not fall")


def test_warning_few_trained_tokens(tmp_path):
    train = [train_record(10, 2.0, tokens=300), train_record(20, 1.0, tokens=600)]

    warnings = find_warnings(make_run(tmp_path, train=train))

    assert warning_containing(warnings, "computed on only 600 tokens")


def test_warning_data_beyond_capacity(tmp_path):
    data = {"train": split_facts(target_tokens=500_000), "valid": split_facts()}

    warnings = find_warnings(make_run(tmp_path, data=data))

    assert warning_containing(warnings, "more than the adapter's 100,000 trainable parameters")


def test_warning_missing_validation_split(tmp_path):
    data = {"train": split_facts(), "valid": None}

    warnings = find_warnings(make_run(tmp_path, val=[], data=data))

    assert warning_containing(warnings, "No valid.jsonl")


def test_warning_truncated_targets(tmp_path):
    data = {"train": split_facts(lost_targets=3, longest=400), "valid": split_facts()}

    warnings = find_warnings(make_run(tmp_path, data=data))

    assert warning_containing(warnings, "3 training examples were cut at max_seq_length 256")


def test_warning_memory_above_plan(tmp_path):
    warnings = find_warnings(make_run(tmp_path, memory_plan_gb=1.0))

    assert warning_containing(warnings, "Peak memory 1.50 GB was 1.5x the plan's 1.00 GB")


def test_warning_non_finite_report(tmp_path):
    train = [train_record(10, float("nan")), train_record(20, 1.0)]

    warnings = find_warnings(make_run(tmp_path, train=train))

    assert warning_containing(warnings, "1 training reports had no finite loss (steps 10)")


# --- numbers and files ---------------------------------------------------------------------


def test_warning_unfinished_run(tmp_path):
    train = [train_record(10, 2.0)]
    val = [val_record(0, 2.5), val_record(10, 1.1)]

    warnings = find_warnings(make_run(tmp_path, train=train, val=val))

    assert warning_containing(warnings, "ended at step 10 of 20")
    assert warning_containing(warnings, f"mlxlora train --resume {tmp_path}")


def test_no_unfinished_warning_after_early_stopping(tmp_path):
    train = [train_record(10, 2.0), train_record(14, 1.5)]
    val = [val_record(0, 2.5), val_record(6, 1.0), val_record(10, 1.005), val_record(14, 1.008)]
    run = make_run(tmp_path, train=train, val=val)
    run.config["early_stopping_patience"] = 2

    warnings = find_warnings(run)

    assert warning_containing(warnings, "ended at step") == []


def test_learning_rate_curve_follows_schedule(tmp_path):
    run = make_run(tmp_path)
    schedule = build_schedule(1.32e-3, 20, "cosine", 1, 0.1)

    steps, rates = learning_rate_curve(run)

    assert steps == list(range(1, 21))
    assert rates == [pytest.approx(float(schedule(i))) for i in range(20)]


def test_write_report_files(tmp_path):
    save_run(make_run(tmp_path))

    markdown, plot = write_report(tmp_path)
    text = markdown.read_text(encoding="utf-8")

    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "| Best validation loss | 1.1000 at step 20 (adapter in best/) |" in text
    assert "| Validation loss before training (step 0) | 2.5000 |" in text
    assert "| rank r | 8 | recipe r.yaml |  |" in text
    assert "- Peak memory: 1.50 GB; the plan estimated 2.00 GB." in text
    assert "- Data check: no warnings." in text
    assert text.rstrip().endswith("## Warnings\n\nNone.")


def test_write_report_without_summary(tmp_path):
    run = make_run(tmp_path)
    run.summary = {}
    save_run(run)

    markdown, _ = write_report(tmp_path)
    text = markdown.read_text(encoding="utf-8")

    assert "| effective batch | 8 | " in text
    assert "- No data summary (run_summary.json is missing)." in text


def test_write_report_compare(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    save_run(make_run(first))
    changed = make_run(second)
    changed.config["r"] = 16
    save_run(changed)

    markdown, plot = write_report(first, [second])
    text = markdown.read_text(encoding="utf-8")

    assert markdown == first / "compare.md"
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "| rank r / lora_alpha | 8 / 16.0 | 16 / 16.0 |" in text
    assert "Settings that differ: `r`." in text
    assert not (first / "report.md").exists()


def test_report_command_writes_and_warns(tmp_path):
    train = [train_record(10, 1.0), train_record(20, 1.2)]
    save_run(make_run(tmp_path, train=train))

    result = CliRunner().invoke(report_command, [str(tmp_path)])

    assert result.exit_code == 0
    assert f"wrote {tmp_path / 'report.md'} and {tmp_path / 'loss.png'}" in result.output
    assert "Training loss did not fall" in result.output


def test_report_command_not_a_run(tmp_path):
    result = CliRunner().invoke(report_command, [str(tmp_path)])

    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError)


# --- metric sinks --------------------------------------------------------------------------


class FakeSummaryWriter:
    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.logged = []
        self.finished = False

    def log(self, values, step):
        self.logged.append((values, step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("tensorboardX")
    module.writers = []

    def summary_writer(log_dir):
        writer = FakeSummaryWriter(log_dir)
        module.writers.append(writer)
        return writer

    module.SummaryWriter = summary_writer
    monkeypatch.setitem(sys.modules, "tensorboardX", module)
    return module


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeWandbRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_check_report_to_unknown_name():
    with pytest.raises(ConfigError) as caught:
        check_report_to(["tensorbord"])

    assert "--report-to tensorbord: unknown metric sink" in str(caught.value)


def test_check_report_to_missing_packages(monkeypatch):
    for module in ("tensorboardX", "torch.utils.tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)

    with pytest.raises(ConfigError) as caught:
        check_report_to(["tensorboard", "wandb"])

    assert caught.value.problems == [
        "--report-to tensorboard: the Python package tensorboardX is not installed. "
        "Install it with: pip install tensorboardX",
        "--report-to wandb: the Python package wandb is not installed. "
        "Install it with: pip install wandb",
    ]


def test_check_report_to_broken_install(monkeypatch):
    real_import = importlib.import_module

    def import_module(name):
        if name == "tensorboardX":
            raise ImportError("libprotobuf.so: cannot open shared object file")
        return real_import(name)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(importlib, "import_module", import_module)

    with pytest.raises(ConfigError) as caught:
        check_report_to(["tensorboard"])

    assert str(caught.value) == (
        "--report-to tensorboard: importing tensorboardX failed (libprotobuf.so: cannot open "
        "shared object file). Repair that installation, or install tensorboardX: "
        "pip install --upgrade tensorboardX")


def test_tensorboard_sink_receives_records(tmp_path, fake_tensorboard):
    fanout = open_metric_sinks(MetricsWriter(tmp_path / "metrics.jsonl"), ["tensorboard"],
                               tmp_path, {})

    fanout.write({"step": 0, "val_loss": 2.0, "val_perplexity": math.exp(2.0)})
    fanout.write({"step": 10, "train_loss": float("nan"), "lr": 1e-3})
    fanout.close()
    writer = fake_tensorboard.writers[0]

    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("val/loss", 2.0, 0), ("val/perplexity", math.exp(2.0), 0),
                              ("train/lr", 1e-3, 10)]
    assert writer.closed


def test_wandb_sink_receives_records(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    fanout = open_metric_sinks(MetricsWriter(tmp_path / "metrics.jsonl"), ["wandb"], tmp_path,
                               {"r": 8})

    fanout.write({"step": 10, "train_loss": 1.5, "tokens_per_second": 250.0})
    fanout.close()
    run = fake_wandb.runs[0]

    assert run.init_kwargs == {"project": "mlxlora", "name": tmp_path.name,
                               "dir": str(tmp_path), "config": {"r": 8}}
    assert run.logged == [({"train/loss": 1.5, "train/tokens_per_second": 250.0}, 10)]
    assert run.finished


def test_wandb_project_from_environment(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "weather")

    open_metric_sinks(MetricsWriter(tmp_path / "metrics.jsonl"), ["wandb"], tmp_path, {})

    assert fake_wandb.runs[0].init_kwargs["project"] == "weather"


def test_failing_sink_is_dropped(tmp_path, caplog):
    class BrokenSink:
        def write(self, record):
            raise OSError("connection refused")

        def close(self):
            pass

    fanout = MetricFanout(MetricsWriter(tmp_path / "metrics.jsonl"), {"wandb": BrokenSink()})

    with caplog.at_level(logging.WARNING, logger="mlxlora"):
        fanout.write({"step": 1, "train_loss": 1.0})
        fanout.write({"step": 2, "train_loss": 0.5})
    fanout.close()

    assert fanout.sinks == {}
    assert len(caplog.records) == 1
    assert "connection refused" in caplog.records[0].getMessage()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# --- the hook in training ------------------------------------------------------------------


def write_chat_data(folder):
    """Write 8 training rows plus a copy of the first, and 4 validation rows of their own."""
    folder.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i} {i} {i}"}]}
            for i in range(12)]
    for split, split_rows in (("train", rows[:8] + rows[:1]), ("valid", rows[8:])):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in split_rows), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_training_writes_summary_report_and_sink(tmp_path, monkeypatch, fake_tensorboard):
    from mlxlora.trainer import train

    model = make_model()

    def load(spec, dtype="auto", dequantize=None, trust_remote_code=False):
        config = {"model_type": "llama", "hidden_size": 32, "vocab_size": 260}
        return LoadedModel(model, make_tokenizer(), spec, tmp_path, config, False, "float32")

    monkeypatch.setattr("mlxlora.session.load_model", load)
    run = tmp_path / "run"
    flags = {"data": str(write_chat_data(tmp_path / "data")), "adapter_path": str(run),
             "iters": 2, "batch_size": 4, "steps_per_report": 1, "report_to": ["tensorboard"]}

    train(resolve_config(None, flags))
    facts = json.loads((run / "run_summary.json").read_text(encoding="utf-8"))
    report = (run / "report.md").read_text(encoding="utf-8")
    total, trainable = parameter_counts(model)
    tags = {(tag, step) for tag, _, step in fake_tensorboard.writers[0].scalars}

    assert facts["parameters"] == {"total": total, "trainable": trainable}
    assert facts["data"]["train"]["examples"] == 9
    assert facts["data"]["valid"]["examples"] == 4
    assert facts["effective_batch"] == 4
    assert facts["memory_plan_gb"] > 0
    assert len(facts["data_check_warnings"]) == 1
    assert facts["data_check_warnings"][0].startswith("train: 1 row is an exact copy")
    assert "| Steps | 2 of 2 |" in report
    assert "- Data check: 1 warning (`mlxlora data check` shows the rows):" in report
    assert (run / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert {("val/loss", 0), ("train/loss", 1), ("train/loss", 2), ("val/loss", 2)} <= tags
    assert fake_tensorboard.writers[0].closed


def test_base_weights_text_names_quantization():
    assert base_weights_text({"dtype": "float32", "quantized_base": True}) == \
        "quantized (QLoRA), computed in float32"
    assert base_weights_text({"dtype": "float32", "dequantized_base": True}) == \
        "float32, dequantized from the quantized model files"
    assert base_weights_text({"dtype": "bfloat16"}) == "bfloat16, not quantized"

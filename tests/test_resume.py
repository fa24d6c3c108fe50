"""Exact resume: a run stopped at step k and resumed matches an uninterrupted run.

Runs go through mlxlora.trainer.train in this process on the tiny llama saved as a model
folder. A run is stopped by setting the stop flag that the SIGINT handler sets, so the
interrupt path (checkpoint, TrainingInterrupted) is the real one.
"""

import json
import logging
import shutil
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from kill_stress import make_workspace, read_metrics, write_dataset
from mlxlora.adapters import AdapterError
from mlxlora.checkpoint import (CheckpointError, checkpoint_problems, checkpoint_step,
                                list_checkpoints, prune_checkpoints, random_state_words,
                                restore_random_state)
from mlxlora.config import resolve_config
from mlxlora.errors import ConfigError
from mlxlora.testing.tiny import make_model, save_model_folder
from mlxlora.trainer import Trainer, TrainingInterrupted, train

FLAGS = {"iters": 10, "batch_size": 2, "steps_per_report": 1, "save_every": 3,
         "steps_per_eval": 4, "val_batches": -1, "lora_dropout": 0.1, "keep_checkpoints": 2,
         "seed": 1}
ACCUMULATION = {"grad_accumulation_steps": 2}
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("resume"))


@pytest.fixture
def log_lines():
    """Collect the mlxlora logger's messages, whatever handlers other tests installed."""
    lines = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("mlxlora")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


def run_training(workspace: Path, output: Path, **overrides):
    flags = {"model": str(workspace / "model"), "data": str(workspace / "data"),
             "adapter_path": str(output), **FLAGS, **overrides}
    return train(resolve_config(flags=flags))


def resume_training(output: Path, **overrides):
    return train(resolve_config(flags={"resume": str(output), **overrides}))


def stop_at(monkeypatch, step: int) -> None:
    """Make training stop after ``step`` as if SIGINT had arrived during it."""
    original = Trainer.one_step

    def one_step(self):
        result = original(self)
        if self.state.step == step and self.stop is not None:
            self.stop.signal_name = "SIGINT"
        return result

    monkeypatch.setattr(Trainer, "one_step", one_step)


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def references(workspace, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, without and with gradient accumulation."""
    root = tmp_path_factory.mktemp("references")
    runs = {"plain": root / "plain", "accumulation": root / "accumulation"}
    run_training(workspace, runs["plain"])
    run_training(workspace, runs["accumulation"], **ACCUMULATION)
    return runs


@pytest.fixture(scope="module")
def stopped_run(workspace, tmp_path_factory) -> Path:
    """A plain run stopped after step 5; tests copy it before changing it."""
    output = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, 5)
        with pytest.raises(TrainingInterrupted):
            run_training(workspace, output)
    return output


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def assert_same_run(resumed: Path, reference: Path) -> None:
    for key in ("train_loss", "lr", "val_loss"):
        expected, actual = read_metrics(reference, key), read_metrics(resumed, key)
        assert sorted(actual) == sorted(expected), key
        for step in expected:
            assert abs(actual[step] - expected[step]) <= TOLERANCE * max(1.0, abs(expected[step])), (key, step)

    expected_weights, actual_weights = final_weights(reference), final_weights(resumed)
    assert sorted(actual_weights) == sorted(expected_weights)
    for name in expected_weights:
        np.testing.assert_allclose(actual_weights[name], expected_weights[name], atol=TOLERANCE)


# Stop and resume.

@pytest.mark.parametrize("kind, stop_step", [("plain", 5), ("accumulation", 3)])
def test_stopped_run_resumes_exactly(kind, stop_step, workspace, references, tmp_path, monkeypatch):
    output = tmp_path / "run"
    extra = ACCUMULATION if kind == "accumulation" else {}
    stop_at(monkeypatch, stop_step)

    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(workspace, output, **extra)
    assert interrupted.value.checkpoint.name == f"step-{stop_step:07d}"
    assert "Continue with: mlxlora train --resume" in str(interrupted.value)
    assert not (output / "adapters.safetensors").exists()

    state = resume_training(output)

    assert state.step == 10
    assert_same_run(output, references[kind])


def test_resumed_trained_tokens_match(stopped_run, references, tmp_path):
    output = copy_run(stopped_run, tmp_path)

    state = resume_training(output)

    reference = read_metrics(references["plain"], "trained_tokens")
    assert state.trained_tokens == reference[10]
    assert read_metrics(output, "trained_tokens") == reference


def test_resume_from_older_checkpoint(references, tmp_path, log_lines):
    output = copy_run(references["plain"], tmp_path)
    for name in ("adapters.safetensors", "adapter_config.json"):
        (output / name).unlink()
    steps = [checkpoint_step(p) for p in list_checkpoints(output / "checkpoints")]
    assert steps == [9, 10]

    resume_training(output / "checkpoints" / "step-0000009")

    aside = list((output / "checkpoints").glob("superseded-*"))
    assert len(aside) == 1
    assert (aside[0] / "step-0000010").is_dir()
    assert any("moved the 1 newer checkpoints" in line for line in log_lines)
    assert_same_run(output, references["plain"])


# What a checkpoint contains.

def test_checkpoint_state_contents(stopped_run):
    folder = stopped_run / "checkpoints" / "step-0000005"
    state = json.loads((folder / "state.json").read_text())
    optimizer = mx.load(str(folder / "optimizer.safetensors"))

    assert checkpoint_problems(folder) == []
    assert state["step"] == 5
    assert int(optimizer["step"].item()) == 5
    assert any(name.endswith(".lora_A.m") for name in optimizer)
    assert state["data_position"]["epoch"] == 0
    assert state["data_position"]["batch_in_epoch"] == 5
    assert state["data_position"]["micro_batch"] == 5
    assert state["data_position"]["batches_per_epoch"] == 12
    assert state["data_position"]["micro_batch_in_step"] == 0
    assert len(state["data_position"]["epoch_order"]) == 16
    assert state["best_step"] == 4
    assert state["best_val_loss"] > 0
    assert state["config"]["seed"] == 1
    assert Path(state["config"]["model"]).is_absolute()
    assert state["total_steps"] == 10
    assert state["learning_rate"] > 0
    assert len(state["random_state"]) == 1
    assert len(state["data_fingerprint"]) == 16


def test_prune_keeps_last_and_best(workspace, tmp_path):
    output = tmp_path / "run"

    state = run_training(workspace, output, iters=8, save_every=2, steps_per_eval=2,
                         keep_checkpoints=1)

    steps = {checkpoint_step(p) for p in list_checkpoints(output / "checkpoints")}
    assert steps == {8, state.best_step}
    leftovers = [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_prune_spares_best_checkpoint(tmp_path):
    for step in (2, 4, 6, 8, 10):
        folder = tmp_path / f"step-{step:07d}"
        folder.mkdir()
        (folder / "state.json").write_text("{}")

    prune_checkpoints(tmp_path, keep=2, protect=4)

    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [4, 8, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000008",
                                                         "step-0000010"]


def test_random_state_round_trip():
    mx.random.seed(11)
    mx.random.uniform(shape=(3,))
    saved = random_state_words()
    expected = mx.random.uniform(shape=(4,))

    mx.random.seed(0)
    restore_random_state(saved)

    assert random_state_words() == saved
    np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(4,))), np.array(expected))


# Changed options on resume.

def test_resume_rejects_changed_settings(stopped_run, tmp_path):
    output = copy_run(stopped_run, tmp_path)

    with pytest.raises(ConfigError) as error:
        resume_training(output, r=4, seed=2, batch_size=3, target_modules=["attention"])

    message = str(error.value)
    assert "these options differ from the checkpoint" in message
    assert "--rank 4: the checkpoint has 8" in message
    assert "--seed 2: the checkpoint has 1" in message
    assert "--batch-size 3: the checkpoint has 2" in message
    assert "--target-modules ['attention']: the checkpoint has ['all-linear']" in message


def test_resume_allows_harmless_change(stopped_run, tmp_path, log_lines):
    output = copy_run(stopped_run, tmp_path)

    state = resume_training(output, steps_per_report=2, learning_rate=1e-3)

    assert state.step == 10
    assert "resume: --steps-per-report changed from 1 to 2" in log_lines
    assert any("--learning-rate changed" in line and "will not match" in line
               for line in log_lines)
    assert sorted(read_metrics(output, "train_loss"))[5:] == [6, 8, 10]


@pytest.mark.parametrize("model_kind, reason", [
    ("other weights", "its weights differ"),
    ("other shapes", "its parameter shapes differ"),
])
def test_resume_rejects_other_base_model(model_kind, reason, stopped_run, tmp_path):
    output = copy_run(stopped_run, tmp_path)
    if model_kind == "other weights":
        # Same shapes; a fine-tune of the same base would differ in its weights like this.
        other = make_model()
        other.model.embed_tokens.weight = other.model.embed_tokens.weight * 3
    else:
        other = make_model(hidden_size=64)
    save_model_folder(tmp_path / "other-model", model=other)

    with pytest.raises(AdapterError) as error:
        resume_training(output, model=str(tmp_path / "other-model"))

    message = str(error.value)
    assert "was trained on base model" in message
    assert reason in message


def test_resume_rejects_other_data(stopped_run, tmp_path):
    output = copy_run(stopped_run, tmp_path)
    data = write_dataset(tmp_path / "other-data", rows=20)

    with pytest.raises(CheckpointError) as error:
        resume_training(output, data=str(data))

    assert "the training data differs from the checkpoint's (20 examples now, 24 then" in str(error.value)


def test_resume_extends_finished_run(references, tmp_path, log_lines):
    output = copy_run(references["plain"], tmp_path)

    state = resume_training(output, iters=14)

    assert state.step == 14
    assert sorted(read_metrics(output, "train_loss")) == list(range(1, 15))
    assert any("the run now has 14 steps instead of 10" in line for line in log_lines)


def test_resume_finished_run_rewrites_adapter(references, tmp_path, log_lines):
    output = copy_run(references["plain"], tmp_path)
    (output / "adapters.safetensors").unlink()

    state = resume_training(output)

    assert state.step == 10
    assert (output / "adapters.safetensors").is_file()
    assert any("the checkpoint is at the last step (10 of 10)" in line for line in log_lines)


# Output folders that already contain a run.

def test_finished_run_rejected(workspace, references, tmp_path):
    output = copy_run(references["plain"], tmp_path)

    with pytest.raises(ConfigError) as error:
        run_training(workspace, output)

    message = str(error.value)
    assert "already contains a finished run" in message
    assert f"--resume {output}" in message
    assert "--overwrite" in message


def test_unfinished_run_rejected(workspace, stopped_run, tmp_path):
    output = copy_run(stopped_run, tmp_path)

    with pytest.raises(ConfigError) as error:
        run_training(workspace, output)

    assert "an unfinished run (last checkpoint: step-0000005)" in str(error.value)


def test_overwrite_replaces_run(workspace, stopped_run, tmp_path):
    output = copy_run(stopped_run, tmp_path)

    state = run_training(workspace, output, iters=2, overwrite=True)

    assert state.step == 2
    steps = [checkpoint_step(p) for p in list_checkpoints(output / "checkpoints")]
    assert steps == [2]
    assert sorted(read_metrics(output, "train_loss")) == [1, 2]


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(CheckpointError) as error:
        resume_training(tmp_path / "empty")

    assert "no checkpoint found" in str(error.value)

"""Fault tolerance of training: signals, kill -9, NaN, full or read-only disks, two runs at once.

Most tests run mlxlora.trainer.train in this process on the tiny llama; the signal and kill
tests start the real CLI in a subprocess.
"""

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

import mlxlora.checkpoint as checkpoint_module
import mlxlora.trainer as trainer_module
from kill_stress import (make_workspace, read_metrics, stress, stress_flags, train_command,
                         unloadable_checkpoints)
from mlxlora.checkpoint import SaveError, checkpoint_problems, checkpoint_step, list_checkpoints
from mlxlora.config import resolve_config
from mlxlora.errors import ConfigError
from mlxlora.run_dir import check_free_space
from mlxlora.run_lock import LOCK_FILE
from mlxlora.trainer import Trainer, TrainingError, TrainingInterrupted, train

FLAGS = {"iters": 10, "batch_size": 2, "steps_per_report": 1, "save_every": 3,
         "steps_per_eval": 4, "val_batches": -1, "lora_dropout": 0.1, "keep_checkpoints": 2,
         "seed": 1}
# mx.save_safetensors raises this when a write fails (ENOSPC), mlx 0.32.
MLX_WRITE_ERROR = "[write] Unable to write 8 bytes to file."
STRESS_KILLS = 20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "run"
    run_training(workspace, output)
    return output


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


def checkpoint_steps(output: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(output / "checkpoints")]


def adapter_weights_of(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def all_finite(weights: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights.values())


# SIGINT and SIGTERM.

@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint(stop_signal, workspace, tmp_path, monkeypatch):
    output = tmp_path / "run"
    original = Trainer.one_step

    def one_step(self):
        result = original(self)
        if self.state.step == 4:
            # The real handler installed by the trainer receives this signal.
            os.kill(os.getpid(), stop_signal)
        return result

    monkeypatch.setattr(Trainer, "one_step", one_step)
    handler_before = signal.getsignal(stop_signal)

    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(workspace, output)

    assert interrupted.value.checkpoint == output / "checkpoints" / "step-0000004"
    assert f"stopped by {stop_signal.name} at step 4/10" in str(interrupted.value)
    assert checkpoint_steps(output) == [3, 4]
    assert checkpoint_problems(interrupted.value.checkpoint) == []
    assert not (output / LOCK_FILE).exists()
    assert signal.getsignal(stop_signal) is handler_before


def read_until(stream, text: str, timeout: float) -> list[str]:
    """Read lines from ``stream`` until one contains ``text``; return the lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not in the output within {timeout} s:\n{''.join(lines)}")


def start_long_run(workspace: Path, output: Path) -> subprocess.Popen:
    flags = ["--iters", "100000", "--batch-size", "2", "--steps-per-report", "1",
             "--save-every", "100000", "--steps-per-eval", "0"]
    return subprocess.Popen(train_command(workspace, output, flags), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_ctrl_c_writes_checkpoint(workspace, tmp_path):
    output = tmp_path / "run"
    process = start_long_run(workspace, output)
    try:
        read_until(process.stderr, "train loss", timeout=120)
        process.send_signal(signal.SIGINT)
        stderr = process.stderr.read()
        returncode = process.wait(timeout=60)
    finally:
        process.kill()

    assert returncode == 130
    assert "SIGINT received: stopping after the current step" in stderr
    assert f"Continue with: mlxlora train --resume {output}" in stderr
    assert "Traceback" not in stderr
    assert len(checkpoint_steps(output)) == 1
    assert unloadable_checkpoints(output) == []
    assert not (output / LOCK_FILE).exists()


@pytest.mark.slow
def test_cli_second_ctrl_c_exits_at_once(workspace, tmp_path):
    output = tmp_path / "run"
    process = start_long_run(workspace, output)
    try:
        read_until(process.stderr, "train loss", timeout=120)
        process.send_signal(signal.SIGINT)
        read_until(process.stderr, "SIGINT received", timeout=30)
        process.send_signal(signal.SIGINT)
        second_sent = time.monotonic()
        returncode = process.wait(timeout=30)
        exit_seconds = time.monotonic() - second_sent
    finally:
        process.kill()

    # The default handler is back, so the second SIGINT ends the process itself.
    assert returncode == -signal.SIGINT
    assert exit_seconds < 5
    assert unloadable_checkpoints(output) == []


# kill -9.

@pytest.mark.slow
def test_kill_nine_stress(workspace, tmp_path):
    """Kill a run STRESS_KILLS times (during saves, steps and at random), then finish it."""
    flags = stress_flags()
    output = tmp_path / "run"

    result = stress(workspace, output, flags, kills=STRESS_KILLS, seed=7)
    finish = subprocess.run(train_command(workspace, output, flags + ["--resume", str(output)]),
                            capture_output=True, text=True)
    reference = subprocess.run(train_command(workspace, tmp_path / "reference", flags),
                               capture_output=True, text=True)

    print(f"kills: {result.kills}, during a save: {result.kills_in_save}, unloadable "
          f"checkpoints: {len(result.unloadable)}, lost: {len(result.lost)}")
    assert result.kills == STRESS_KILLS
    assert result.kills_in_save >= 1
    assert result.unloadable == []
    assert result.lost == []
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = read_metrics(tmp_path / "reference", "train_loss")
    resumed = read_metrics(output, "train_loss")
    assert sorted(resumed) == sorted(expected) == list(range(1, 81))
    for step in expected:
        assert abs(resumed[step] - expected[step]) <= 1e-6, step


# NaN and inf.

def inject_nan(monkeypatch, step: int) -> None:
    """Turn the loss mask of step ``step`` (0-based) into NaN, so loss and gradients are NaN."""
    original = trainer_module.step_batches

    def step_batches(session, order, index):
        micro_batches, sources, normalizer, tokens = original(session, order, index)
        if index == step:
            inputs, targets, mask = micro_batches[0]
            micro_batches[0] = (inputs, targets, mask * float("nan"))
        return micro_batches, sources, normalizer, tokens

    monkeypatch.setattr(trainer_module, "step_batches", step_batches)


def test_nan_stops_with_report(workspace, tmp_path, monkeypatch):
    output = tmp_path / "run"
    inject_nan(monkeypatch, step=4)

    with pytest.raises(TrainingError) as error:
        run_training(workspace, output)

    message = str(error.value)
    assert message.startswith("step 5: the loss is nan")
    assert re.search(r"batch rows: \S+/train\.jsonl:\d+, \S+/train\.jsonl:\d+\.", message)
    assert "Likely causes: " in message
    assert f"The last checkpoint, {output}/checkpoints/step-0000003, is kept" in message
    assert "--nan-policy skip" in message
    assert checkpoint_steps(output) == [3]
    assert all_finite(adapter_weights_of(output / "checkpoints" / "step-0000003"))
    assert not (output / "adapters.safetensors").exists()
    assert not (output / LOCK_FILE).exists()


@pytest.mark.parametrize("bad_step", [0, 4])
def test_nan_skip_policy_continues(bad_step, workspace, reference, tmp_path, monkeypatch,
                                   log_lines):
    output = tmp_path / "run"
    inject_nan(monkeypatch, step=bad_step)

    state = run_training(workspace, output, nan_policy="skip")

    assert state.step == 10
    assert any(f"step {bad_step + 1}: the loss is nan" in line and "The batch is skipped" in line
               for line in log_lines)
    assert all_finite(adapter_weights_of(output))
    final = mx.load(str(output / "checkpoints" / "step-0000010" / "optimizer.safetensors"))
    assert int(final["step"].item()) == 10
    skipped_tokens = read_metrics(reference, "trained_tokens")
    assert state.trained_tokens < skipped_tokens[10]
    losses = read_metrics(output, "train_loss")
    assert math.isnan(losses[bad_step + 1])
    assert all(math.isfinite(losses[s]) for s in losses if s != bad_step + 1)


def test_high_learning_rate_named_as_cause(workspace, tmp_path, monkeypatch):
    output = tmp_path / "run"
    inject_nan(monkeypatch, step=1)

    with pytest.raises(TrainingError) as error:
        run_training(workspace, output, learning_rate=5.0)

    message = str(error.value)
    assert "learning rate too high: peak 5 is" in message
    assert "No checkpoint was written before this step: start again with --overwrite" in message


# Full disk.

def fail_checkpoint_writes(monkeypatch, run_dir: Path, from_step: int) -> None:
    """Make checkpoint writes into ``run_dir`` fail like a full disk from ``from_step`` on."""
    original = checkpoint_module.atomic_save_safetensors

    def save(path, arrays, metadata=None):
        match = re.search(r"\.step-(\d+)\.partial", str(path))
        if str(path).startswith(str(run_dir)) and match and int(match.group(1)) >= from_step:
            raise RuntimeError(MLX_WRITE_ERROR)
        return original(path, arrays, metadata)

    monkeypatch.setattr(checkpoint_module, "atomic_save_safetensors", save)


def test_full_disk_save_rescued(workspace, reference, tmp_path, monkeypatch, log_lines):
    output = tmp_path / "run"
    rescue_parent = tmp_path / "temporary"
    rescue_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_parent))
    fail_checkpoint_writes(monkeypatch, output, from_step=6)

    with pytest.raises(SaveError) as error:
        run_training(workspace, output)

    message = str(error.value)
    rescued = next(rescue_parent.glob("mlxlora-rescue-*")) / "checkpoints" / "step-0000010"
    assert message.startswith(f"cannot write checkpoint {output}/checkpoints/step-0000010: "
                              f"{MLX_WRITE_ERROR}")
    assert f"mlxlora train --resume {rescued} --adapter-path {output}" in message
    assert any("cannot write checkpoint" in line and "step-0000006" in line
               and "the next save tries again" in line for line in log_lines)
    assert checkpoint_steps(output) == [3]
    assert checkpoint_problems(rescued) == []

    monkeypatch.undo()
    state = train(resolve_config(flags={"resume": str(rescued), "adapter_path": str(output)}))

    assert state.step == 10
    expected, actual = adapter_weights_of(reference), adapter_weights_of(output)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6)
    assert read_metrics(output, "train_loss") == read_metrics(reference, "train_loss")


def test_free_space_check_names_sizes(tmp_path):
    with pytest.raises(ConfigError) as error:
        check_free_space(tmp_path, needed_bytes=10 ** 18)

    message = str(error.value)
    assert f"--adapter-path {tmp_path}: " in message
    assert "MB free, but the checkpoints and adapter of this run need about 1000000000000.0 MB" in message


@contextmanager
def mounted_tmpfs(folder: Path, size: str, read_only: bool = False):
    """Mount a small tmpfs at ``folder``; skip the test where mounting is not allowed."""
    folder.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@contextmanager
def read_only_folder(folder: Path):
    """Make ``folder`` read-only: by permissions, or for root (who ignores them) by a mount."""
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder, "Permission denied"
        finally:
            folder.chmod(0o755)
        return
    with mounted_tmpfs(folder, "1m", read_only=True):
        yield folder, "Read-only file system"


def test_read_only_folder_rejected(workspace, tmp_path):
    with read_only_folder(tmp_path / "readonly") as (folder, reason):
        with pytest.raises(ConfigError) as error:
            run_training(workspace, folder)

    message = str(error.value)
    assert message.startswith(f"--adapter-path {folder}: cannot create the lock file ({reason})")
    assert "Choose a folder you can write to" in message


def test_full_disk_rejected_at_start(workspace, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "256k") as folder:
        with pytest.raises(ConfigError) as error:
            run_training(workspace, folder)
        leftovers = sorted(p.name for p in folder.iterdir())

    message = str(error.value)
    assert message.startswith(f"--adapter-path {folder}: cannot write there (No space left on device)")
    assert "Free disk space" in message
    assert leftovers == []


def test_disk_filling_up_during_run(workspace, tmp_path, monkeypatch, log_lines):
    """A real ENOSPC mid-run: saves fail and are retried, the last one is rescued."""
    rescue_parent = tmp_path / "temporary"
    rescue_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_parent))
    original = Trainer.one_step

    def one_step(self):
        result = original(self)
        if self.state.step == 4:
            fill_disk(self.session.run_dir / "filler")
        return result

    monkeypatch.setattr(Trainer, "one_step", one_step)
    with mounted_tmpfs(tmp_path / "small", "3m") as folder:
        with pytest.raises(SaveError) as error:
            run_training(workspace, folder / "run")
        steps = checkpoint_steps(folder / "run")
        problems = unloadable_checkpoints(folder / "run")

    message = str(error.value)
    assert "No space left on device" in message or MLX_WRITE_ERROR in message
    assert "was written to" in message
    assert steps == [3]
    assert problems == []
    assert any("step-0000006" in line and "the next save tries again" in line for line in log_lines)
    rescued = next(rescue_parent.glob("mlxlora-rescue-*")) / "checkpoints" / "step-0000010"
    assert checkpoint_problems(rescued) == []


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# Two runs in one folder.

def test_concurrent_run_rejected(workspace, tmp_path, log_lines):
    output = tmp_path / "run"
    output.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mlxlora.run_lock import RunLock\n"
         "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)",
         str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as error:
            run_training(workspace, output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    message = str(error.value)
    assert f"--adapter-path {output} is in use by another mlxlora train (PID {holder.pid} on " in message
    assert "choose another --adapter-path" in message

    state = run_training(workspace, output, iters=2)

    assert state.step == 2
    assert any("taking over a stale lock" in line and f"PID {holder.pid}" in line
               for line in log_lines)
    assert not (output / LOCK_FILE).exists()


def test_lock_rejects_second_holder(tmp_path):
    from mlxlora.run_lock import RunLock

    with RunLock(tmp_path):
        content = json.loads((tmp_path / LOCK_FILE).read_text())
        with pytest.raises(ConfigError):
            RunLock(tmp_path).acquire()

    assert content["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()

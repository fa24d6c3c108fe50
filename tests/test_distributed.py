"""Data-parallel training with mx.distributed's ring backend, two processes on loopback.

The ranks are started directly with MLX_HOSTFILE and MLX_RANK rather than through
mlx.launch, whose launcher process busy-waits on one of the two cores this suite may have.
"""

import json
import os
import socket
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxlora.testing.tiny import save_model_folder

pytestmark = pytest.mark.slow

TRAIN_FLAGS = ["--iters", "6", "--batch-size", "4", "--steps-per-report", "1",
               "--steps-per-eval", "3", "--save-every", "3", "--learning-rate", "1e-2"]
# No LoRA dropout: each process draws dropout masks for its own rows, so with dropout the
# runs agree in distribution but not number for number.


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_model_folder(root / "model")
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Repeat {i} twice"},
                          {"role": "assistant", "content": f"{i} {i}"}]} for i in range(30)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    return root


def train_command(workspace, output, extra=()):
    return [sys.executable, "-m", "mlxlora.cli", "train", "--model", str(workspace / "model"),
            "--data", str(workspace / "data"), "--adapter-path", str(output), *TRAIN_FLAGS,
            *extra]


def run_ranks(workspace, output, world: int = 2, extra=()) -> list[subprocess.CompletedProcess]:
    hostfile = workspace / f"hosts-{output.name}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(world)]))
    processes = []
    for rank in range(world):
        env = dict(os.environ, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank),
                   OPENBLAS_NUM_THREADS="1")
        processes.append(subprocess.Popen(train_command(workspace, output, extra), env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                   stderr))
    return results


def read_metrics(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [m["train_loss"] for m in lines if "train_loss" in m]
    valid = [m["val_loss"] for m in lines if "val_loss" in m]
    return train, valid


@pytest.fixture(scope="module")
def single_and_pair(workspace):
    single = subprocess.run(train_command(workspace, workspace / "one"), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = run_ranks(workspace, workspace / "two")
    for result in ranks:
        assert result.returncode == 0, result.stderr[-3000:]
    return workspace / "one", workspace / "two", ranks


def test_two_processes_match_one(single_and_pair):
    one, two, _ = single_and_pair
    train_one, valid_one = read_metrics(one)
    train_two, valid_two = read_metrics(two)
    assert len(train_one) == 6
    np.testing.assert_allclose(train_two, train_one, atol=1e-5)
    np.testing.assert_allclose(valid_two, valid_one, atol=1e-5)


def test_two_processes_same_adapter(single_and_pair):
    one, two, _ = single_and_pair
    first = mx.load(str(one / "adapters.safetensors"))
    second = mx.load(str(two / "adapters.safetensors"))
    assert set(first) == set(second)
    for name in first:
        np.testing.assert_allclose(np.array(second[name]), np.array(first[name]), atol=1e-5)


def test_only_rank_zero_logs_progress(single_and_pair):
    _, _, ranks = single_and_pair
    assert "train loss" in ranks[0].stderr
    assert "train loss" not in ranks[1].stderr


def test_indivisible_batch_rejected(workspace):
    ranks = run_ranks(workspace, workspace / "odd", extra=["--batch-size", "3"])
    assert all(r.returncode == 2 for r in ranks)
    assert "--batch-size 3 is not divisible by the 2 processes" in ranks[0].stderr


def test_unreadable_hostfile_named(workspace):
    env = dict(os.environ, MLX_HOSTFILE=str(workspace / "missing.json"), MLX_RANK="0")
    result = subprocess.run(train_command(workspace, workspace / "nohost"), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "MLX_HOSTFILE" in result.stderr
    assert "missing.json" in result.stderr

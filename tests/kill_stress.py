"""Kill -9 stress test of `mlxlora train`: kill a run at random moments, resume it, repeat.

Each round starts the CLI (resuming when a checkpoint exists) and kills it with SIGKILL in
one of three ways: the moment a checkpoint save starts, a few steps into training, or at a
random time. After every kill each checkpoint must be complete and loadable, and the newest
checkpoint must be no older than before the round. At the end the run is resumed to the end
and its per-step losses must equal an uninterrupted run's.

tests/test_faults.py runs this in CI; run it alone for a report:

    python tests/kill_stress.py --kills 20
"""

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from mlxlora.checkpoint import (CHECKPOINTS_DIR, OPTIMIZER_FILE, STATE_FILE, checkpoint_problems,
                                checkpoint_step, list_checkpoints)
from mlxlora.testing.tiny import save_model_folder

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
KILL_MODES = ("save", "steps", "random")
# A round trains at most about this many steps past its newest checkpoint, so 20 rounds
# cannot finish a run of stress_flags' default length before the last kill.
MAX_STEPS_PER_ROUND = 3
ROUND_TIMEOUT_SECONDS = 120


def write_dataset(folder: Path, rows: int = 24) -> Path:
    """Write a small completions data set: train.jsonl and valid.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4))
        lines.append(json.dumps({"prompt": prompt, "completion": WORDS[i % len(WORDS)] * (1 + i % 3)}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    valid = [json.dumps({"prompt": WORDS[i], "completion": WORDS[(i + 1) % len(WORDS)]})
             for i in range(6)]
    (folder / "valid.jsonl").write_text("\n".join(valid) + "\n")
    return folder


def make_workspace(root: Path) -> Path:
    """Create a tiny model folder and a data set under ``root``."""
    save_model_folder(root / "model")
    write_dataset(root / "data")
    return root


def train_command(workspace: Path, output: Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "mlxlora.cli", "train", "--model", str(workspace / "model"),
            "--data", str(workspace / "data"), "--adapter-path", str(output), *flags]


def read_metrics(run_dir: Path, key: str) -> dict[int, float]:
    """Return {step: value} of one metric from a run's metrics.jsonl."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values


def unloadable_checkpoints(run_dir: Path) -> list[str]:
    """Return a problem for every checkpoint that is incomplete or fails to load."""
    problems = []
    for folder in list_checkpoints(run_dir / CHECKPOINTS_DIR):
        found = checkpoint_problems(folder)
        if not found:
            try:
                mx.eval(list(mx.load(str(folder / "adapters.safetensors")).values()))
                mx.eval(list(mx.load(str(folder / OPTIMIZER_FILE)).values()))
                json.loads((folder / STATE_FILE).read_text())
            except (RuntimeError, ValueError, OSError) as error:
                found = [str(error)]
        problems.extend(f"{folder.name}: {p}" for p in found)
    return problems


def newest_step(run_dir: Path) -> int:
    checkpoints = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    return checkpoint_step(checkpoints[-1]) if checkpoints else -1


def save_in_progress(run_dir: Path) -> bool:
    root = run_dir / CHECKPOINTS_DIR
    return root.is_dir() and any(p.name.endswith(".partial") for p in root.iterdir())


def count_lines(log: Path, text: str) -> int:
    try:
        return log.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


@dataclass
class Round:
    mode: str
    returncode: int
    killed: bool
    killed_in_save: bool
    newest_before: int
    newest_after: int
    seconds: float


@dataclass
class StressResult:
    rounds: list[Round] = field(default_factory=list)
    unloadable: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(r.killed for r in self.rounds)

    @property
    def kills_in_save(self) -> int:
        return sum(r.killed_in_save for r in self.rounds)


def wait_and_kill(process: subprocess.Popen, mode: str, output: Path, log: Path,
                  rng: random.Random) -> bool:
    """Kill ``process`` with SIGKILL at a moment chosen by ``mode``; return True if killed.

    "save" kills while one of the round's first MAX_STEPS_PER_ROUND checkpoints is being
    written. "steps" kills up to 20 ms after 1 to MAX_STEPS_PER_ROUND steps. "random" kills
    at a random time in the first 3 s (often while loading), or after MAX_STEPS_PER_ROUND
    steps if those come first.
    """
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    saves_before_kill = rng.randint(0, MAX_STEPS_PER_ROUND - 1)
    steps_before_kill = rng.randint(1, MAX_STEPS_PER_ROUND)
    random_time = time.monotonic() + rng.uniform(0.2, 3.0)

    training = False
    while process.poll() is None and time.monotonic() < deadline:
        if mode == "save" and not training:
            # Until training starts, a .partial folder is a leftover of the last round.
            training = count_lines(log, "train loss") > 0
            time.sleep(0.005)
            continue
        if mode == "save":
            if save_in_progress(output) and count_lines(log, "checkpoint written") >= saves_before_kill:
                break
            time.sleep(0.001)
            continue

        steps = count_lines(log, "train loss")
        if mode == "steps" and steps >= steps_before_kill:
            time.sleep(rng.uniform(0.0, 0.02))
            break
        if mode == "random" and (time.monotonic() >= random_time or steps >= MAX_STEPS_PER_ROUND):
            break
        time.sleep(0.005)

    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def run_round(workspace: Path, output: Path, flags: list[str], mode: str,
              rng: random.Random) -> Round:
    newest_before = newest_step(output)
    extra = ["--resume", str(output)] if newest_before >= 0 else ["--overwrite"]
    log = output.parent / f"{output.name}.log"
    started = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen(train_command(workspace, output, flags + extra),
                                   stdout=subprocess.DEVNULL, stderr=handle)
        killed = wait_and_kill(process, mode, output, log, rng)
    # Leftover .partial folders are removed before training starts, so after the first step
    # one can only come from a save this round was killed in.
    in_save = killed and count_lines(log, "train loss") > 0 and save_in_progress(output)
    return Round(mode, process.returncode, killed, in_save, newest_before, newest_step(output),
                 time.monotonic() - started)


def stress(workspace: Path, output: Path, flags: list[str], kills: int,
           seed: int = 0) -> StressResult:
    """Kill and resume a run until ``kills`` kills landed (or the run finished)."""
    rng = random.Random(seed)
    result = StressResult()
    attempts = 0
    while result.kills < kills and attempts < 2 * kills:
        mode = KILL_MODES[attempts % len(KILL_MODES)]
        attempts += 1
        round_ = run_round(workspace, output, flags, mode, rng)
        result.rounds.append(round_)
        result.unloadable.extend(unloadable_checkpoints(output))
        if round_.newest_after < round_.newest_before:
            result.lost.append(f"round {attempts}: newest checkpoint went from step "
                               f"{round_.newest_before} to {round_.newest_after}")
        if not round_.killed:
            break
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mlxlora-kill-stress"))
    args = parser.parse_args()

    workspace = make_workspace(args.folder)
    flags = stress_flags(args.iters)
    result = stress(workspace, args.folder / "run", flags, args.kills)
    finish = subprocess.run(train_command(workspace, args.folder / "run",
                                          flags + ["--resume", str(args.folder / "run")]),
                            capture_output=True, text=True)
    reference = subprocess.run(train_command(workspace, args.folder / "reference",
                                             flags + ["--overwrite"]), capture_output=True, text=True)
    for i, r in enumerate(result.rounds, 1):
        print(f"round {i:2d}: {r.mode:6s} killed={r.killed} in_save={r.killed_in_save} "
              f"newest {r.newest_before} -> {r.newest_after} ({r.seconds:.1f} s)")
    print(f"kills: {result.kills}, during a save: {result.kills_in_save}, unloadable "
          f"checkpoints: {len(result.unloadable)}, lost: {len(result.lost)}")
    print(f"final run exit {finish.returncode}, reference exit {reference.returncode}")
    if finish.returncode == 0 and reference.returncode == 0:
        resumed = read_metrics(args.folder / "run", "train_loss")
        expected = read_metrics(args.folder / "reference", "train_loss")
        worst = max(abs(resumed[s] - expected[s]) for s in expected)
        print(f"per-step train loss: {len(expected)} steps, max difference {worst:.3g}")


def stress_flags(iters: int = 80) -> list[str]:
    """Return train flags for a short run that saves at every step, with dropout on."""
    return ["--iters", str(iters), "--batch-size", "2", "--steps-per-report", "1",
            "--save-every", "1", "--steps-per-eval", "10", "--val-batches", "-1",
            "--keep-checkpoints", "2", "--lora-dropout", "0.1", "--seed", "3"]


if __name__ == "__main__":
    main()

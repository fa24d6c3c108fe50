"""Train the benchmark's mlxlora run with a chosen CPU buffer cache limit, step by step.

    python benchmarks/cache_limit.py SETTINGS.json LIMIT_GB [--seed N]

SETTINGS.json is a settings file that vs_mlx_lm.py wrote in its --work folder (for example
float32-mlxlora-0.settings.json). The run is `mlxlora train`'s, through run_tool.py, with
mx.set_cache_limit(LIMIT_GB) in place of mlxlora's own limit. For every step it prints the
wall time, the process's user and system CPU time and its minor page faults, which show
where a step's time goes when the process grows into memory it has not touched before.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

import run_tool
from mlxlora import session, trainer


def record_steps(rows: list) -> None:
    """Wrap Trainer.one_step to append (wall s, user s, system s, minor faults) per step."""
    original = trainer.Trainer.one_step

    def one_step(self, *args, **kwargs):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = original(self, *args, **kwargs)
        mx.synchronize()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((time.perf_counter() - started, after.ru_utime - before.ru_utime,
                     after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
        return result

    trainer.Trainer.one_step = one_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", type=Path, help="A settings file written by vs_mlx_lm.py.")
    parser.add_argument("limit_gb", type=float, help="CPU buffer cache limit in GB.")
    parser.add_argument("--seed", type=int, default=None, help="Seed; default: the file's.")
    args = parser.parse_args()

    settings = json.loads(args.settings.read_text(encoding="utf-8"))
    if args.seed is not None:
        settings["seed"] = args.seed
    label = f"cache-{args.limit_gb:g}-seed-{settings['seed']}"
    settings["adapter_path"] = str(args.settings.parent / "adapters" / label)
    settings_path = args.settings.parent / f"{label}.settings.json"
    settings_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")

    session.CPU_CACHE_LIMIT = int(args.limit_gb * 1e9)
    rows = []
    record_steps(rows)
    result_path = args.settings.parent / f"{label}.result.json"
    run_tool.main("mlxlora", str(settings_path), str(result_path))

    result = json.loads(result_path.read_text(encoding="utf-8"))
    print(f"cache limit {args.limit_gb:g} GB, seed {settings['seed']}: loop "
          f"{result['loop_seconds']:.1f} s, median step {result['median_step_seconds']:.2f} s, "
          f"max RSS {result['max_rss_bytes'] / 1e9:.1f} GB")
    print("| step | wall s | user s | system s | minor page faults |\n| ---: | ---: | ---: | ---: | ---: |")
    for number, (wall, user, system, faults) in enumerate(rows, start=1):
        print(f"| {number} | {wall:.1f} | {user:.1f} | {system:.1f} | {faults:,} |")


if __name__ == "__main__":
    main()

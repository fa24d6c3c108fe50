"""The output folder of a run: created, probed for writing, and never silently replaced."""

import os
import shutil
from pathlib import Path

from mlxlora.errors import ConfigError

RUN_MARKERS = ("adapter_config.json", "checkpoints", "metrics.jsonl")


def check_writable(folder: Path) -> None:
    """Fail now, not after an hour of training, when the folder cannot be written."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--adapter-path {folder}: cannot write there ({error.strerror}); "
                          "choose another folder or free disk space") from None


def prepare_run_dir(config) -> Path:
    """Create the run folder, refusing to replace an earlier run unless asked to."""
    folder = Path(config.adapter_path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--adapter-path {folder} is a file; pass a folder")

    earlier = [name for name in RUN_MARKERS if (folder / name).exists()]
    if earlier and not (config.overwrite or config.resume):
        raise ConfigError(
            f"--adapter-path {folder} already holds a run ({', '.join(earlier)}). Pass --resume "
            f"{folder} to continue it, --overwrite to replace it, or another --adapter-path.")

    if earlier and config.overwrite and not config.resume:
        for name in earlier + ["best"]:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--adapter-path {folder}: cannot create it ({error.strerror})") from None
    check_writable(folder)
    return folder

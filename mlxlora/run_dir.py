"""The output folder of a run: created, locked, probed for writing, never silently replaced."""

import logging
import os
import re
import shutil
from pathlib import Path

from mlxlora.checkpoint import CHECKPOINTS_DIR, list_checkpoints, remove_leftovers
from mlxlora.errors import ConfigError
from mlxlora.run_lock import RunLock

logger = logging.getLogger("mlxlora")

FINISHED_MARKERS = ("adapters.safetensors", "adapter_config.json")
RUN_MARKERS = FINISHED_MARKERS + (CHECKPOINTS_DIR, "metrics.jsonl")
# Everything a run writes into its folder; --overwrite deletes these names and nothing else.
RUN_FILES = RUN_MARKERS + ("best", "training_config.json", "run_summary.json", "report.md",
                           "loss.png", "tensorboard", "wandb", "adapter_model.safetensors")
# files.py writes ".NAME.tmpPID.EXT" before renaming; a killed run can leave one behind.
TEMPORARY_FILE = re.compile(r"^\..+\.tmp\d+(\.[A-Za-z0-9]+)?$")
PROBE_BYTES = 1 << 20


def check_writable(folder: Path) -> None:
    """Fail now, not after an hour of training, when the folder cannot be written."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise ConfigError(f"--adapter-path {folder}: cannot write there ({error.strerror}). "
                          "Free disk space, fix the folder's permissions, or choose another "
                          "--adapter-path.") from None
    finally:
        probe.unlink(missing_ok=True)


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Raise ConfigError when the folder's disk cannot hold the run's checkpoints."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(
            f"--adapter-path {folder}: {free / 1e6:.1f} MB free, but the checkpoints and adapter "
            f"of this run need about {needed_bytes / 1e6:.1f} MB. Free disk space, lower "
            "--keep-checkpoints, or choose another --adapter-path.")


def describe_run(folder: Path) -> str | None:
    """Return a description of the run in ``folder`` ("a finished run", ...) or None."""
    present = [name for name in RUN_MARKERS if (folder / name).exists()]
    if not present:
        return None
    if all((folder / name).is_file() for name in FINISHED_MARKERS):
        return "a finished run"
    checkpoints = list_checkpoints(folder / CHECKPOINTS_DIR)
    if checkpoints:
        return f"an unfinished run (last checkpoint: {checkpoints[-1].name})"
    return f"the files of an earlier run ({', '.join(present)})"


def delete_run_files(folder: Path) -> None:
    for name in RUN_FILES:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def remove_temporary_files(folder: Path) -> None:
    """Delete write leftovers of killed runs; only the lock holder may call this."""
    for parent in (folder, folder / "best"):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if path.is_file() and TEMPORARY_FILE.match(path.name):
                path.unlink(missing_ok=True)
    removed = remove_leftovers(folder / CHECKPOINTS_DIR)
    if removed:
        logger.info("removed leftovers of an interrupted save: %s", ", ".join(removed))


def create_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--adapter-path {folder} is a file; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--adapter-path {folder}: cannot create it ({error.strerror}). "
                          "Choose a folder you can write to.") from None


def prepare_run_dir(config, resume_folder: Path | None = None,
                    is_main: bool = True) -> tuple[Path, RunLock | None]:
    """Create and lock the run folder, refusing to replace an earlier run unless asked to.

    ``resume_folder`` is the run folder of the checkpoint being resumed, if any. Returns the
    folder and the lock, which the caller releases when the run ends. The other processes of
    a distributed run (``is_main`` False) take no lock and delete nothing.
    """
    folder = Path(config.adapter_path)
    create_folder(folder)
    if not is_main:
        return folder, None

    try:
        lock = RunLock(folder).acquire()
    except OSError as error:
        raise ConfigError(f"--adapter-path {folder}: cannot create the lock file "
                          f"({error.strerror}). Choose a folder you can write to.") from None
    try:
        check_earlier_run(folder, config, resume_folder)
        remove_temporary_files(folder)
        check_writable(folder)
    except BaseException:
        lock.release()
        raise
    return folder, lock


def check_earlier_run(folder: Path, config, resume_folder: Path | None) -> None:
    earlier = describe_run(folder)
    if earlier is None:
        return
    if resume_folder is not None and same_folder(resume_folder, folder):
        return
    if config.resume and earlier != "a finished run" and not config.overwrite:
        # A checkpoint from elsewhere (a rescue folder, a copy) continues this unfinished run.
        logger.warning("resuming into %s, which contains %s; its checkpoints newer than the "
                       "resumed step are moved aside", folder, earlier)
        return
    if config.overwrite:
        logger.info("--overwrite: deleting %s in %s", earlier, folder)
        delete_run_files(folder)
        return

    hint = (f"Pass --resume {folder} to continue it, --overwrite to replace it, or another "
            "--adapter-path.")
    if config.resume:
        hint = ("Resume into that folder itself (leave out --adapter-path), pass --overwrite to "
                "replace this one, or choose another --adapter-path.")
    raise ConfigError(f"--adapter-path {folder} already contains {earlier}. {hint}")


def same_folder(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False

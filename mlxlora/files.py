"""Atomic file writes: a crash or kill -9 leaves either the old file or the new one.

Each write goes to a temporary file in the same folder, is flushed and fsynced, then
renamed over the target with os.replace, which is atomic on POSIX file systems.
"""

import json
import os
from pathlib import Path

import mlx.core as mx


def _fsync_folder(folder: Path) -> None:
    # The rename itself is only durable once the folder entry is on disk.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def _replace(temporary: Path, path: Path) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        temporary.write_text(text, encoding="utf-8")
        _replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_json(path: Path, content) -> None:
    atomic_write_text(path, json.dumps(content, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        mx.save_safetensors(str(temporary), arrays, metadata=metadata or {})
        _replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

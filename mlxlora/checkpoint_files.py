"""Low-level checks and moves for checkpoint folders: completeness, fsync, atomic renames."""

import json
import os
import shutil
from pathlib import Path

SAFETENSORS_PREFIX_BYTES = 8


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries, so a rename inside it survives a power loss."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        # Some file systems (network mounts) reject fsync on folders; the rename still happened.
        pass
    finally:
        os.close(descriptor)


def safetensors_problem(path: Path) -> str | None:
    """Return why a .safetensors file is missing or incomplete, or None when it is whole.

    The header states the byte range of every tensor, so a file cut short by a crash or a
    full disk is shorter than the header promises.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(SAFETENSORS_PREFIX_BYTES)
            if len(prefix) < SAFETENSORS_PREFIX_BYTES:
                return f"{path.name}: {size} bytes, shorter than a safetensors header"
            header_length = int.from_bytes(prefix, "little")
            if header_length > size - SAFETENSORS_PREFIX_BYTES:
                return f"{path.name}: header cut short ({size} bytes)"
            header = json.loads(handle.read(header_length))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as error:
        return f"{path.name} is unreadable ({error})"

    if not isinstance(header, dict):
        return f"{path.name}: invalid safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = SAFETENSORS_PREFIX_BYTES + header_length + max(ends, default=0)
    if size != expected:
        return f"{path.name}: {size} bytes, its header describes {expected}"
    return None


def json_problem(path: Path) -> str | None:
    """Return why a JSON file is missing or invalid, or None when it parses."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError) as error:
        return f"{path.name} is unreadable ({error})"
    except json.JSONDecodeError as error:
        return f"{path.name}:{error.lineno}: invalid JSON ({error.msg})"
    return None


def remove_folder_atomically(folder: Path, suffix: str) -> None:
    """Rename ``folder`` to a hidden name, then delete it.

    A kill during the slow delete then leaves a hidden leftover, which the next run removes,
    instead of a half-deleted folder under a real name.
    """
    doomed = folder.with_name(f".{folder.name}.{suffix}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    fsync_folder(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)

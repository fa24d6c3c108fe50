"""One training process per output folder, enforced with an flock-ed lock file.

The lock file holds the owner's PID, host and start time for the error message. The lock
itself is an flock on the open file, which the kernel releases when the process dies in any
way (kill -9 included), so a lock left by a dead run is detected as stale and taken over.
NOTE: flock is advisory and per host; two hosts writing one network folder are not excluded.
"""

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from mlxlora.errors import ConfigError

logger = logging.getLogger("mlxlora")

LOCK_FILE = ".mlxlora-train.lock"


class RunLock:
    """An exclusive lock on a run folder, held until release() or process exit."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.handle = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise ConfigError naming the process that holds it."""
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = describe_owner(read_owner(handle))
                handle.close()
                raise ConfigError(
                    f"--adapter-path {self.path.parent} is in use by another mlxlora train "
                    f"({owner}). Wait for it to finish, stop it (Ctrl-C writes a checkpoint), "
                    "or choose another --adapter-path.") from None

            # A releasing owner may have deleted the file after we opened it. Our lock is then
            # on an orphaned inode, so we must lock the new file instead.
            if same_file(handle, self.path):
                break
            handle.close()

        previous = read_owner(handle)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.info("taking over a stale lock in %s left by %s, which is no longer running",
                        self.path.parent, describe_owner(previous))
        self.handle = handle
        self.write_owner()
        return self

    def write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(owner) + "\n")
        self.handle.flush()

    def release(self) -> None:
        """Delete the lock file and drop the lock; safe to call twice."""
        if self.handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        self.handle.close()
        self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def read_owner(handle) -> dict:
    handle.seek(0)
    try:
        content = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return content if isinstance(content, dict) else {}


def describe_owner(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return (f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}")

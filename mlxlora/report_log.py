"""Run output: the log, the progress bar and metrics.jsonl.

Every report is one fixed-format log line, so runs can be compared with grep. The rich
progress bar is shown only on a terminal.
"""

import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger("mlxlora")


def setup_logging(verbose: bool = False) -> None:
    """Send mlxlora's log to stderr: rich formatting on a terminal, plain lines otherwise."""
    if logger.handlers:
        return
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


class MetricsWriter:
    """Append one JSON object per report to metrics.jsonl, flushed at once."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.handle = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class ProgressBar:
    """A rich progress bar on a terminal; does nothing elsewhere."""

    def __init__(self, total: int, start: int = 0, enabled: bool | None = None):
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("train", total=total, completed=start, status="")
            self.progress.start()

    def update(self, step: int, status: str) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


class Throughput:
    """Tokens per second between two reports."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate_and_reset(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate

"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM: finish the step, write a checkpoint, exit.

The first signal only sets a flag that the training loop checks between optimizer steps.
It also restores the default handlers, so a second Ctrl-C or SIGTERM ends the process at
once; atomic writes keep every checkpoint whole even then.
"""

import logging
import signal
import threading

logger = logging.getLogger("mlxlora")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Turns the first SIGINT or SIGTERM into a request to stop after the current step.

    Use as a context manager around the training loop; handlers are installed only in the
    main thread, because Python delivers signals there alone.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def handle(self, number: int, frame) -> None:
        self.signal_name = signal.Signals(number).name
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_DFL)
        logger.warning("%s received: stopping after the current step to write a checkpoint. "
                       "Press Ctrl-C again to exit at once without one; the last checkpoint "
                       "stays intact.", self.signal_name)

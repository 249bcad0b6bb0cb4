"""Clean stop on pre-emption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they kill a job) asks
the training to finish its current optimizer step, save ``last.pth`` at that step boundary and exit with
``PREEMPTED_EXIT_CODE``. A second signal ends the process at once (the default action of that signal).

Only a flag is set here; the train loop reads it with ``requested()`` and all-reduces it with its per-step check,
so every rank stops after the same step even when the signal reaches them at different moments.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, retry later": the run is unfinished but resumable with `-r auto`
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_state = {"requested": None, "owner_pid": None}


class Preempted(Exception):
    """Raised by the train loop after the step at which a stop was requested; ``last.pth`` holds that step."""

    def __init__(self, epoch: int, global_step: int):
        super().__init__(f"stopped on request after optimizer step {global_step} (epoch {epoch})")
        self.epoch, self.global_step = epoch, global_step


def requested() -> bool:
    """True once a stop signal reached this process (while a ``StopSignalHandler`` is installed)."""
    return _state["requested"] is not None


def _on_signal(signum, frame) -> None:
    if os.getpid() != _state["owner_pid"]:
        return  # a forked data-loader worker: the training process decides; the worker must live to the end of the step
    if _state["requested"] is None:
        _state["requested"] = signum
        # the next signal gets the default action: the process ends at once, even inside a blocking call
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        logger.warning(
            "%s received: finishing the current step, then saving last.pth and exiting with code %d "
            "(a second signal stops at once)", signal.Signals(signum).name, PREEMPTED_EXIT_CODE,
        )


class StopSignalHandler:
    """``with StopSignalHandler(): ...`` installs the handlers for the duration of a training (main thread only;
    elsewhere it does nothing) and puts the previous ones back."""

    def __init__(self):
        self._previous: dict = {}

    def __enter__(self) -> StopSignalHandler:
        _state.update(requested=None, owner_pid=os.getpid())
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        _state.update(requested=None, owner_pid=None)

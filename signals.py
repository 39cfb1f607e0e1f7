"""Stop signals: what the training process does with SIGINT/SIGTERM/SIGUSR1, and what its workers do.

A scheduler (SLURM, systemd, ``timeout``) or Ctrl-C stops a run with a signal; the run saves the
step it stopped at and exits with a status a job script can read (:func:`stop_exit_code`). Data
workers leave stopping to the main process (:func:`ignore_stop_signals`).
"""
from __future__ import annotations

import signal
from collections.abc import Callable

# SIGUSR1 is what SLURM's --signal sends before a time limit: exit status 3 means "requeue me and
# resume". SIGINT/SIGTERM exit as a process killed by them would (128 + signal number).
REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def stop_exit_code(signum: int) -> int:
    return REQUEUE_EXIT_CODE if signum == signal.SIGUSR1 else 128 + signum


class GracefulStop:
    """Records the first of SIGINT/SIGTERM/SIGUSR1 (``signum``) so the loop can save a checkpoint
    before exiting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:     # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int = 0, then: Callable[[int], None] | None = None) -> None:
    """A DataLoader worker_init_fn: the worker ignores the stop signals (SIGINT, SIGTERM and SLURM's
    SIGUSR1, whose default action would kill it), then runs `then`.

    `timeout`, systemd, SLURM and Ctrl-C signal the whole process group. torch's own SIGTERM handler
    in a worker exits it, and the main process then reports a crashed worker with a traceback in the
    middle of its clean stop; ignoring them leaves the stop to the main process, which shuts its
    workers down (and they exit by themselves if the main process dies).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)

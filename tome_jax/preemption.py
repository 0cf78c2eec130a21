"""Stopping a run: on SIGTERM (a preemption) save at the next step boundary, then exit at once."""

from __future__ import annotations

import os
import signal
import sys

import jax


def exit_now(status: int) -> None:
    """Ends the process with `status` at once, all processes together.

    Skips the interpreter's teardown, where tf.data's iterators (shuffle buffers,
    parallel decoding threads) can outlast a preemption's grace period. Callers first finish what must reach disk (checkpoints, metrics).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_count() > 1:
        jax.distributed.shutdown()  # waits for every process, so none is cut off mid-save
    os._exit(status)


class Preemption:
    """Turns SIGTERM into "save at the next step boundary, then exit".

    On one process a Python handler notes the signal. On several, JAX's preemption
    service (started by `jax.distributed.initialize`) receives it and names one
    step for all processes, so none waits in a collective for one that stopped;
    the run's orbax CheckpointManager asks it (`reached_preemption`). A Python
    handler would replace the service's, so none is installed there.
    """

    def __init__(self, manager):
        """`manager`: the run's orbax CheckpointManager (`Checkpoints.manager`)."""
        self.requested = False
        self._manager = manager
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self) -> None:
        """Gives SIGTERM back to the handler it had before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """True on every process at the same step once any must stop."""
        if jax.process_count() > 1:
            return self._manager.reached_preemption(step)
        return self.requested

"""Stall detection: a thread per rank that turns a rank making no progress into a failed job.

The trainer reports where it is with ``beat(phase, iteration, microbatch, microbatches)``: a new
iteration, each micro-batch it draws (phase ``data`` while the loader produces it, ``iteration``
while the schedule computes), a save, an evaluation. A beat is one attribute assignment. When a
phase lasts longer than ``distributed.hang_timeout_minutes`` with no new beat, the thread writes
one line with the rank's grid coordinates and its position (phase, iteration, the last micro-batch
drawn) and then every thread's Python stack, all in one write, to stderr, and ends the process with
``HANG_EXIT_CODE``; torchrun then stops the other ranks.

A rank stuck on its own (a sleep, a deadlock, a dead filesystem) holds the others in their next
collective, so their watchdogs fire too, after the same timeout counted from about the same beat:
every rank's stack is dumped, the stuck one's showing where it is. Over gloo a rank that exits
fails its peers' collectives at once, and a rank failing that way prints only its own traceback;
so after dumping, the thread waits ``EXIT_GRACE_SECONDS`` before exiting, time for the peers'
watchdogs, whose deadlines fall within the same moment, to dump theirs.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

HANG_EXIT_CODE = 124       # as timeout(1): the process was ended for running too long
EXIT_GRACE_SECONDS = 2.0   # between this rank's dump and its exit (module docstring)


@dataclass(frozen=True)
class Position:
    """Where the trainer last said it was, and since when (``time.monotonic()``)."""

    phase: str                          # start-up | iteration | data | eval | save | shut-down
    since: float
    iteration: Optional[int] = None     # 1-based, the iteration running (or the one just completed for save/eval)
    microbatch: Optional[int] = None    # 0-based, the micro-batch being drawn (phase data) or last drawn
    microbatches: Optional[int] = None  # micro-batches in this iteration

    def describe(self) -> str:
        where = f"phase '{self.phase}'"
        if self.iteration is not None:
            where += f", iteration {self.iteration}"
        if self.microbatch is not None:
            drawing = "drawing" if self.phase == "data" else "drawn"
            where += f", micro-batch {self.microbatch + 1} of {self.microbatches} {drawing}"
        return where


def thread_stacks() -> str:
    """Every thread's Python stack, innermost call last, as ``traceback`` prints them."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "".join(f"\nThread {names.get(ident, ident)} (most recent call last):\n" + "".join(traceback.format_stack(frame))
                   for ident, frame in sys._current_frames().items())


class Watchdog:
    """Ends this process when one phase runs longer than ``timeout_minutes`` (module docstring).

    ``label`` names the rank in the dump ("rank 3 (tp 1 cp 0 pp 0 dp 1)"). Until ``start`` no
    thread runs and beats only record the position.
    """

    def __init__(self, timeout_minutes: float, label: str):
        self.timeout = timeout_minutes * 60.0
        self.timeout_minutes, self.label = timeout_minutes, label
        self.position: Optional[Position] = None
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, phase: str, iteration: Optional[int] = None, microbatch: Optional[int] = None,
             microbatches: Optional[int] = None) -> None:
        """Enter ``phase``: its clock starts now."""
        self.position = Position(phase, time.monotonic(), iteration, microbatch, microbatches)

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        """Sleep until the current phase's deadline; fire if no beat came in the meantime."""
        while not self._stopped.is_set():
            position = self.position
            left = self.timeout if position is None else position.since + self.timeout - time.monotonic()
            if left <= 0 and position is self.position:
                self._fire(position)
            self._stopped.wait(max(left, 0.0))

    def _fire(self, position: Position) -> None:
        seconds = time.monotonic() - position.since
        header = (f"watchdog: {self.label}: no progress for {seconds:.1f} s in {position.describe()}, longer "
                  f"than distributed.hang_timeout_minutes {self.timeout_minutes:g}; the stacks of every "
                  f"thread follow, then this process exits with code {HANG_EXIT_CODE}\n")
        sys.stderr.flush()
        # One write: the other ranks' watchdogs dump into the same log at the same moment, and a dump
        # written piece by piece (faulthandler's) would interleave with theirs.
        os.write(sys.stderr.fileno(), (header + thread_stacks()).encode(errors="replace"))
        time.sleep(EXIT_GRACE_SECONDS)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HANG_EXIT_CODE)

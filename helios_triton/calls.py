"""The stage calls that streams are waiting on, across the server's processes.

A stage process can hang while it still looks alive: a deadlock, a frozen cgroup, a driver
call that never returns. Its process state says nothing (S or D, as any busy process), and
tritonserver keeps answering health checks. What does show it is a caller waiting on a stage
that answers no one: while the ``helios`` model waits on a BLS call to a stage (a render, a
decode, the next AR tokens), it keeps a file ``<calls dir>/<pid>-<thread id>`` that names the
stage; the file is written when the wait begins (its mtime) and removed when the answer
comes, and each answer touches ``<calls dir>/answered/<stage>``. The supervisor reads the
folder at every poll: a wait older than its stall timeout on a stage that has answered
nobody for as long is a hung stage (a long wait alone is a queue: sixteen streams on two
CPU cores wait seconds for the refiner), and it heals the server as it does for a dead one.
A folder, like the sessions' mailboxes: any process can
read it, a process that dies leaves nothing locked, and the server empties it at every
(re)start (``HELIOS_CALLS_DIR``).

Nothing here imports ``triton_python_backend_utils``; it is tested in ordinary processes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class CallWatch:
    """Marks this process's waits on stages in ``folder`` (None: marks nothing)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:  # once per process, not at every answer
            with contextlib.suppress(OSError):
                (folder / "answered").mkdir(exist_ok=True)

    @contextlib.contextmanager
    def waiting(self, stage: str):
        """Marks the wait for the duration of the block, and its answer after it. Best
        effort: a mark that cannot be written (the server stopping removes the folder)
        never fails the call it marks."""
        if self.folder is None:
            yield
            return
        path = self.folder / f"{os.getpid()}-{threading.get_ident()}"
        with contextlib.suppress(OSError):
            path.write_text(stage)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
                for name in stage.split(", "):
                    (self.folder / "answered" / name).touch()


@dataclass
class Wait:
    stage: str
    caller_pid: int
    seconds: float


def silent_for(folder: Path, stage: str, now: float | None = None) -> float:
    """Seconds since ``stage`` last answered a wait (since the folder was made, if never)."""
    now = time.time() if now is None else now
    for path in (folder / "answered" / stage, folder):
        try:
            return now - path.stat().st_mtime
        except OSError:
            continue
    return float("inf")


def hung(folder: Path, stall_s: float, now: float | None = None) -> Wait | None:
    """The longest wait older than ``stall_s`` on a stage (one of its stages, for a wait on
    several) that has answered no wait for as long; None if there is none."""
    now = time.time() if now is None else now
    for wait in waits(folder, now):
        if wait.seconds <= stall_s:
            break
        if any(silent_for(folder, name, now) > stall_s for name in wait.stage.split(", ")):
            return wait
    return None


def waits(folder: Path, now: float | None = None) -> list[Wait]:
    """The waits marked in ``folder`` now, longest first."""
    now = time.time() if now is None else now
    out = []
    for path in folder.glob("*-*"):
        try:
            stage, started = path.read_text(), path.stat().st_mtime
        except OSError:  # the answer came meanwhile
            continue
        if stage:  # else being written: a wait that has just begun
            out.append(Wait(stage, int(path.name.split("-")[0]), now - started))
    return sorted(out, key=lambda w: -w.seconds)

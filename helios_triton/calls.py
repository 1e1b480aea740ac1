"""The stage calls that streams are waiting on, across the server's processes.

A stage process can hang while it still looks alive: a deadlock, a frozen cgroup, a driver
call that never returns. Its process state says nothing (S or D, as any busy process), and
tritonserver keeps answering health checks. What does show it is a caller waiting: while
the ``helios`` model waits on a BLS call to a stage (a render, a decode, the next AR tokens),
it keeps a file ``<calls dir>/<pid>-<thread id>`` that names the stage; the file is written
when the wait begins (its mtime) and removed when the answer comes. The supervisor reads the
folder at every poll, and a wait older than its stall timeout is a hung stage: it heals the
server as it does for a dead one. A folder, like the sessions' mailboxes: any process can
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

    @contextlib.contextmanager
    def waiting(self, stage: str):
        if self.folder is None:
            yield
            return
        path = self.folder / f"{os.getpid()}-{threading.get_ident()}"
        path.write_text(stage)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


@dataclass
class Wait:
    stage: str
    caller_pid: int
    seconds: float


def waits(folder: Path, now: float | None = None) -> list[Wait]:
    """The waits marked in ``folder`` now, longest first."""
    now = time.time() if now is None else now
    out = []
    for path in folder.glob("*-*"):
        try:
            stage, started = path.read_text(), path.stat().st_mtime
        except OSError:  # the answer came meanwhile
            continue
        out.append(Wait(stage or "unknown", int(path.name.split("-")[0]), now - started))
    return sorted(out, key=lambda w: -w.seconds)

"""Prompt updates for running streams, across the server's processes.

A stream of the ``helios`` model that carries a ``SESSION_ID`` owns a folder
``<sessions dir>/<SESSION_ID>`` while it runs: its mailbox. The ``helios_update`` model, in a
process of its own, drops an update there (one JSON file, written whole and then renamed)
and waits for the answer; the stream reads its mailbox before each latent frame (a directory
listing: nothing to wait on), applies the updates to its ``helios.session.PromptSwitches``
and answers each with the frame the new prompt holds from, or the error. A player's report of
the frame it shows (``send_shown``) is one file, ``shown.json``, that each report replaces and
that nobody answers: the stream reads it while its pacer holds it back. ``stream.json`` tells
``helios_update`` the stream's length, to check a reported frame. A folder, not a
socket or shared memory: Triton may run the two models in any of its stub processes, a stub
that dies leaves nothing locked, and the supervisor empties the folder when it (re)starts
the server (``HELIOS_SESSIONS_DIR``).

Nothing here imports ``triton_python_backend_utils``; it is tested in ordinary processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from helios.errors import HeliosError
from helios.session import PromptSwitches, check_frame

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
UPDATE_TIMEOUT_S = 10.0


def check_session_id(value) -> str:
    """A SESSION_ID element (bytes or text): 1 to 64 letters, digits, '_' or '-'."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not _SESSION_ID.match(value):
        raise HeliosError("SESSION_ID", f"must be 1 to 64 letters, digits, '_' or '-', "
                                        f"got {value!r}")
    return value


def _sessions_root(root: Path | None) -> Path:
    if root is None:
        raise HeliosError("SESSION_ID", "cannot be used: this server has no sessions folder "
                                        "(HELIOS_SESSIONS_DIR is not set)")
    return root


def _write(path: Path, entry: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)  # readers see the whole file or none


class Mailbox:
    """The mailbox of one running stream; ``switches`` receives what arrives in it."""

    def __init__(self, root: Path | None, session_id: str, switches: PromptSwitches):
        session_id = check_session_id(session_id)
        self.folder = _sessions_root(root) / session_id
        self.switches = switches
        try:
            self.folder.mkdir(parents=False)
        except FileExistsError:
            raise HeliosError("SESSION_ID", f"{session_id!r} is in use by a running stream") from None
        except FileNotFoundError:
            raise HeliosError("SESSION_ID", f"cannot be used: the sessions folder {str(root)!r} "
                                            f"does not exist") from None
        _write(self.folder / "stream.json", {"num_frames": switches.num_frames})

    def poll(self) -> int:
        """Apply the updates that arrived, oldest first, answering each; -> how many."""
        names = sorted(p.name for p in os.scandir(self.folder) if p.name.startswith("u-"))
        for name in names:
            path = self.folder / name
            try:
                entry = json.loads(path.read_text())
                frame = self.switches.update(entry["prompt"], entry.get("at_frame"),
                                             sent_at=entry.get("sent_at"))
                answer = {"frame": frame}
            except HeliosError as e:
                answer = {"error": str(e)}
            except (OSError, ValueError, KeyError) as e:
                answer = {"error": f"update unreadable: {e}"}
            path.unlink(missing_ok=True)
            _write(self.folder / ("a-" + name[2:]), answer)
        return len(names)

    def read_shown(self) -> None:
        """Hand the player's latest report to ``switches.shown`` (read each time: a small
        file, read while the pacer holds the stream, every 50 ms at most)."""
        try:
            entry = json.loads((self.folder / "shown.json").read_text())
            self.switches.shown(int(entry["frame"]), float(entry["at"]))
        except (OSError, ValueError, KeyError, TypeError, HeliosError):
            pass  # none yet, or unreadable: the pacer's model of the player holds meanwhile

    def close(self) -> None:
        """The stream ended: refuse what comes later and remove the folder."""
        self.switches.end()
        try:
            self.poll()  # updates that came during the last frame: answered with the end
        except OSError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


class MailboxSwitches(PromptSwitches):
    """PromptSwitches that read their stream's mailbox before each decision."""

    mailbox: Mailbox | None = None

    def due(self, latent: int):
        if self.mailbox is not None:
            self.mailbox.poll()
        return super().due(latent)

    def player(self):
        if self.mailbox is not None:
            self.mailbox.read_shown()
        return super().player()


def _running(root: Path | None, session_id) -> Path:
    """The mailbox folder of the running stream ``session_id``; HeliosError if none."""
    session_id = check_session_id(session_id)
    folder = _sessions_root(root) / session_id
    if not folder.is_dir():
        raise HeliosError("SESSION_ID", f"{session_id!r} names no running stream")
    return folder


def send_shown(root: Path | None, session_id, frame) -> int:
    """Report that the player of stream ``session_id`` shows ``frame`` now; -> the frame.
    Nothing waits for the stream: its pacer reads the report while it holds the stream back.
    HeliosError for an unknown session or a frame outside its video."""
    folder = _running(root, session_id)
    try:
        num_frames = int(json.loads((folder / "stream.json").read_text())["num_frames"])
        frame = check_frame(frame, num_frames, "SHOWN_FRAME")
        _write(folder / "shown.json", {"frame": frame, "at": time.time()})
    except FileNotFoundError:
        raise HeliosError("SESSION_ID", f"{folder.name!r} names no running stream") from None
    return frame


def send_update(root: Path | None, session_id, prompt: str, at_frame: int | None,
                timeout_s: float = UPDATE_TIMEOUT_S) -> int:
    """Hand an update to the stream ``session_id`` and wait for its answer: the frame the
    prompt holds from. HeliosError for an unknown session, a bad or late update, or a stream
    that ended or did not answer in ``timeout_s`` seconds."""
    folder = _running(root, session_id)
    session_id = folder.name
    key = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    try:
        _write(folder / f"u-{key}", {"prompt": prompt, "at_frame": at_frame,
                                     "sent_at": time.time()})
    except FileNotFoundError:
        raise HeliosError("SESSION_ID", f"{session_id!r} names no running stream") from None
    answer, deadline = folder / f"a-{key}", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            entry = json.loads(answer.read_text())
        except FileNotFoundError:
            if not folder.is_dir():
                raise HeliosError("SESSION_ID", f"{session_id!r}: the stream ended before "
                                                f"taking the update") from None
            time.sleep(0.005)
            continue
        answer.unlink(missing_ok=True)
        if "error" in entry:
            field, _, detail = entry["error"].partition(" ")
            raise HeliosError(field, detail)
        return int(entry["frame"])
    (folder / f"u-{key}").unlink(missing_ok=True)
    raise HeliosError("SESSION_ID", f"{session_id!r}: the stream did not take the update "
                                    f"within {timeout_s:g} s")

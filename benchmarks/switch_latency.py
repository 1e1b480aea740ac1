"""How long a prompt update takes to show, at the client, through Triton's gRPC streaming.

    python benchmarks/switch_latency.py --url localhost:8001 --seconds 20 --every 2 --out OUT

One stream with a session id; each ``--every`` seconds of received video an update goes to
``helios_update`` (from a thread, so the stream is read on), for the next latent frame not
yet rendered. Per update: the time until its answer (the frame F it holds from) and until the
chunk holding frame F arrives: the first frame generated under the new prompt, as a viewer
sees it. With ``--server-log`` (the server's log file), each update's time split as the
``helios`` model logged it: from the update reaching the stream to its latent-frame boundary
(``boundary_ms``), from there to its first frame handed to Triton (``server_ms``); the rest
of the first frame's time is the way there and back. Prints a table with the medians, writes
switch_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from helios_client import HeliosClient
from helios_client.api import new_session_id

PROMPTS = ["a blue square moving up on a dark background",
           "a red circle moving left on a dark background"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("HELIOS_GRPC_URL", "localhost:8001"))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=2.0, help="seconds of video between updates")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--config", default=None, help="recorded in the JSON")
    ap.add_argument("--server", default=None,
                    help="how the server was filled (fill_repository's options), recorded in the JSON")
    ap.add_argument("--server-log", type=Path, default=None,
                    help="the server's log file: each switch's time as the server logged it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.server_log is not None and not args.server_log.is_file():
        ap.error(f"--server-log must be the server's log file, got {str(args.server_log)!r} "
                 f"(not a file)")
    log_from = args.server_log.stat().st_size if args.server_log else 0  # this run's lines

    session_id = new_session_id()
    steering = HeliosClient(args.url)
    updates: list[dict] = []
    lock = threading.Lock()

    def send(prompt: str) -> None:
        entry = {"prompt": prompt, "sent_s": time.perf_counter()}
        try:
            entry["frame"] = steering.update(session_id, prompt)
        except Exception as e:  # noqa: BLE001 - reported in the table
            entry["error"] = str(e)
        entry["answered_s"] = time.perf_counter()
        with lock:
            updates.append(entry)

    t0 = time.perf_counter()
    next_at, k, threads = args.every * args.fps, 0, []
    stream = HeliosClient(args.url).stream(PROMPTS[1], duration_s=args.seconds, fps=args.fps,
                                           seed=0, session_id=session_id)
    for chunk in stream:
        now = time.perf_counter()
        end = chunk.offset + len(chunk.frames)
        with lock:
            for u in updates:
                if "frame" in u and "shown_s" not in u and chunk.offset <= u["frame"] < end:
                    u["shown_s"] = now
        if end >= next_at and end < args.seconds * args.fps - args.every * args.fps / 2:
            threads.append(threading.Thread(target=send, args=(PROMPTS[k % 2],)))
            threads[-1].start()
            k, next_at = k + 1, next_at + args.every * args.fps
    for t in threads:
        t.join()
    logged = server_switches(args.server_log, log_from) if args.server_log else {}
    rows = [{"frame": u.get("frame"), "error": u.get("error"),
             "answer_ms": (u["answered_s"] - u["sent_s"]) * 1e3,
             "first_frame_ms": (u["shown_s"] - u["sent_s"]) * 1e3 if "shown_s" in u else None,
             **logged.get(u.get("frame"), {})}
            for u in sorted(updates, key=lambda u: u["sent_s"])]
    shown = [r["first_frame_ms"] for r in rows if r["first_frame_ms"] is not None]
    result = {"date": time.strftime("%Y-%m-%d"), "device": _device(), "config": args.config,
              "server": args.server, "seconds": args.seconds, "updates": rows,
              "answer_median_ms": statistics.median(r["answer_ms"] for r in rows) if rows else None,
              "first_frame_median_ms": statistics.median(shown) if shown else None,
              "first_frame_max_ms": max(shown) if shown else None,
              "total_s": time.perf_counter() - t0}
    for key in ("boundary_ms", "server_ms"):
        split = [r[key] for r in rows if key in r]
        result[f"{key[:-3]}_median_ms"] = statistics.median(split) if split else None
    print(f"{'update':>6} {'frame':>6} {'answer ms':>10} {'first frame under it ms':>24}"
          f" {'to its boundary ms':>19} {'then out ms':>12}")
    nan = float("nan")
    for i, r in enumerate(rows):
        print(f"{i:>6} {r['frame'] if r['frame'] is not None else '-':>6} {r['answer_ms']:>10.0f} "
              f"{r['first_frame_ms'] if r['first_frame_ms'] is not None else nan:>24.0f}"
              f" {r.get('boundary_ms', nan):>19.0f} {r.get('server_ms', nan):>12.0f}"
              + (f"  {r['error']}" if r["error"] else ""))
    if shown:
        print(f"median: answer {result['answer_median_ms']:.0f} ms, first frame under the new "
              f"prompt {result['first_frame_median_ms']:.0f} ms (max {result['first_frame_max_ms']:.0f})"
              + (f"; the server's log: {result['boundary_median_ms']:.0f} ms to the boundary, "
                 f"{result['server_median_ms']:.0f} ms from there to the frame sent"
                 if result["server_median_ms"] is not None else ""))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "switch_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if rows and len(shown) == len(rows) else 1


_SWITCHED = re.compile(r"prompt switched at frame (\d+): applied (\d+) ms after the update "
                       r"reached the stream, its first frame out (\d+) ms later")


def server_switches(log: Path, start: int, wait_s: float = 5.0) -> dict[int, dict]:
    """The switches the server logged after byte ``start`` of its log, by frame: the time from
    the update reaching the stream to its boundary, and from there to its first frame sent.
    Waits up to ``wait_s`` for the log to be written."""
    found: dict[int, dict] = {}
    deadline = time.monotonic() + wait_s
    while True:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        for m in _SWITCHED.finditer(text):
            found[int(m[1])] = {"boundary_ms": float(m[2]), "server_ms": float(m[3])}
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _device() -> str:
    from client_fps import device_name  # noqa: PLC0415  (beside this script)

    return device_name()


if __name__ == "__main__":
    sys.exit(main())

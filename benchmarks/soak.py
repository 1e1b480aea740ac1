"""Soak: a supervised server under load and faults for minutes, then one table.

    python benchmarks/soak.py --minutes 10 --streams 16 --kill-every 60   (make soak)

``--streams`` clients stream videos back to back, each cancelled at a random point with
probability ``--cancel``; every ``--kill-every`` seconds one stage process, chosen in turn,
is killed with SIGKILL. The table: streams finished, cancelled, cut (a running stream ended by
an error), refused (no stream: the server was healing), errors by kind,
hangs (a stream that outlived its deadline), heals and their times, and the KV blocks and AR
sequences still in use once the load has stopped. JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from helios.checkpoint import init_checkpoint
from helios_client import HeliosClient
from helios_triton.fill_repository import fill, values
from helios_triton.server import TritonServer, free_ports
from helios_triton.supervisor import Supervisor, active_streams

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up",
           "a green triangle bouncing", "a yellow circle growing on a light background"]
STAGES = ["refiner", "ar_backbone", "vae_decoder", "text_encoder", "helios"]


def client_loop(grpc: int, stop: threading.Event, rng: random.Random, cancel: float,
                deadline_s: float, tally: collections.Counter, errors: collections.Counter):
    while not stop.is_set():
        seconds = rng.choice([2, 4, 8])
        cut_after = rng.randint(0, seconds * 6) if rng.random() < cancel else None
        t0, started = time.monotonic(), False
        try:
            stream = HeliosClient(f"127.0.0.1:{grpc}", timeout_s=deadline_s).stream(
                rng.choice(PROMPTS), duration_s=seconds, seed=rng.randrange(2**31))
            for i, _ in enumerate(stream):
                started = True
                if cut_after is not None and i >= cut_after:
                    stream.close()
                    tally["cancelled"] += 1
                    break
            else:
                tally["finished"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            kind = type(e).__name__
            if time.monotonic() - t0 >= deadline_s:
                tally["hangs"] += 1
            elif started:
                tally["cut"] += 1       # a stream that was running ended with an error
            else:
                tally["refused"] += 1   # no stream: the server was down (healing) or refused it
            errors[f"{kind}: {str(e)[:60]}"] += 1
            time.sleep(1.0)


def ar_in_use(metrics_url: str) -> tuple[float, float]:
    """(KV blocks in use, AR sequences live) from the ar_backbone's gauges."""
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    value = lambda line: float(line.rsplit(" ", 1)[1])  # noqa: E731
    blocks = sum(value(x) for x in lines
                 if x.startswith("helios_kv_cache_blocks{") and 'state="used"' in x)
    sequences = sum(value(x) for x in lines if x.startswith("helios_ar_active_sequences{"))
    return blocks, sequences


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--kill-every", type=float, default=60, help="seconds between stage kills")
    ap.add_argument("--cancel", type=float, default=0.3, help="chance a stream is cancelled")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="default: a random tiny checkpoint made here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="helios-soak-"))
    ckpt = args.checkpoint or init_checkpoint("tiny", tmp / "ckpt", seed=0)
    fill(tmp / "repo", values(ckpt, "cpu", args.streams, False,
                              {"text_encoder": 1, "refiner": 1, "vae_decoder": 1,
                               "helios_video": 1}, 0.5), ROOT / "model_repository")
    http, grpc, metrics = free_ports(3)
    server = TritonServer(tmp / "repo", http, grpc, metrics, log_file=tmp / "server.log",
                          backends=tmp / "backends", address="127.0.0.1")
    sup = Supervisor(server, tmp / "draining", ready_timeout=300,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"starting a supervised server ({args.streams} streams) ...", file=sys.stderr, flush=True)
    sup.start()
    stop, tally, errors = threading.Event(), collections.Counter(), collections.Counter()
    deadline_s = 120.0
    clients = [threading.Thread(target=client_loop, daemon=True,
                                args=(grpc, stop, random.Random(i), args.cancel, deadline_s,
                                      tally, errors)) for i in range(args.streams)]
    for c in clients:
        c.start()
    t_end = time.monotonic() + args.minutes * 60
    kills, next_kill = 0, time.monotonic() + args.kill_every
    try:
        while time.monotonic() < t_end:
            time.sleep(1)
            if time.monotonic() >= next_kill:
                model = STAGES[kills % len(STAGES)]
                victims = [s for s in sup.stubs.values() if s.model == model]
                if victims:
                    print(f"soak: SIGKILL to {model} (pid {victims[0].pid})", file=sys.stderr,
                          flush=True)
                    try:
                        os.kill(victims[0].pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    kills += 1
                next_kill = time.monotonic() + args.kill_every
            if int(time.monotonic()) % 30 == 0:
                print(f"soak: {int(t_end - time.monotonic())} s left, {dict(tally)}",
                      file=sys.stderr, flush=True)
    finally:
        stop.set()
        for c in clients:
            c.join(deadline_s + 10)
        hung_threads = sum(c.is_alive() for c in clients)
        time.sleep(2)  # the last cancellations reach the AR scheduler
        sup.wait_serving(300)  # a heal under way ends first: the counts are the healed server's
        leaked = ar_in_use(f"http://127.0.0.1:{metrics}/metrics")
        still_streaming = active_streams(f"http://127.0.0.1:{metrics}/metrics")
        sup.stop()
    heal_times = [h["seconds"] for h in sup.heals if h["seconds"] is not None]
    result = {"date": time.strftime("%Y-%m-%d"), "minutes": args.minutes, "streams": args.streams,
              "kills": kills, "finished": tally["finished"], "cancelled": tally["cancelled"],
              "cut": tally["cut"], "refused": tally["refused"],
              "hangs": tally["hangs"] + hung_threads,
              "heals": len(heal_times), "failed_heals": len(sup.heals) - len(heal_times),
              "heal_s_median": statistics.median(heal_times) if heal_times else None,
              "heal_s_max": max(heal_times) if heal_times else None,
              "kv_blocks_in_use_after": leaked[0], "ar_sequences_after": leaked[1],
              "streams_active_after": still_streaming, "errors": dict(errors)}
    print(f"\n{'streams':>7} {'minutes':>7} {'finished':>8} {'cancelled':>9} {'cut':>5} "
          f"{'refused':>7} {'hangs':>5} {'kills':>5} {'heals':>5} {'heal s (median/max)':>20} "
          f"{'KV blocks leaked':>16}")
    print(f"{args.streams:>7} {args.minutes:>7.1f} {result['finished']:>8} {result['cancelled']:>9} "
          f"{result['cut']:>5} {result['refused']:>7} {result['hangs']:>5} {kills:>5} {result['heals']:>5} "
          f"{(result['heal_s_median'] or 0):>9.1f} / {(result['heal_s_max'] or 0):<8.1f} "
          f"{result['kv_blocks_in_use_after']:>16.0f}")
    for kind, n in errors.most_common(5):
        print(f"  {n:>5} x {kind}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'soak.json'}")
    ok = result["hangs"] == 0 and result["kv_blocks_in_use_after"] == 0 and not result["failed_heals"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""FPS and first-frame latency at the client, through Triton's gRPC streaming, for N
concurrent streams (helios-client's Python API).

    python benchmarks/client_fps.py --url localhost:8001 --seconds 10 --concurrency 1 4 --out OUT

Per stream: frames received / (last chunk time - send time), send -> first chunk, and the
playback lag: how late the latest chunk came for a player that starts at the first chunk and
shows 24 frames a second (0: the video plays in real time from its first frame). Each
concurrency level starts all its streams together. With ``--metrics-url`` (Triton's metrics
endpoint) each level also records the ``ar_backbone`` decode rounds it took
(``helios_ar_iterations`` before and after): plan tokens / rounds is the average batch of
the AR's rounds. With ``--stats-url`` (Triton's HTTP endpoint; the admin key from
HELIOS_ADMIN_KEY, which ``helios_triton.server --run`` sets) each level also records where the
server's time went, per model: requests, and the mean queue wait, input copy, execution and
output copy per request (Triton's statistics, before and after the level). Prints tables,
writes client_fps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path


from helios_client import HeliosClient
from helios_client.api import STREAM_MODEL

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up",
           "a green triangle bouncing", "a yellow circle growing on a light background"]


def one_stream(url, prompt, seconds, seed, out: dict, fps: int = 24):
    t0 = time.perf_counter()
    first, frames, lag = None, 0, 0.0
    try:
        for chunk in HeliosClient(url, timeout_s=600).stream(prompt, duration_s=seconds, seed=seed):
            now = time.perf_counter() - t0
            if first is None:
                first = now
            # A player that starts with the first chunk shows frame k at first + k / fps:
            # how late this chunk's first frame is for it (> 0: the picture stalls).
            lag = max(lag, now - (first + chunk.offset / fps))
            frames += len(chunk.frames)
    except Exception as e:  # noqa: BLE001 - a failed stream is reported, the others still count
        out.update(error=f"{type(e).__name__}: {e}", frames=frames)
        return
    total = time.perf_counter() - t0
    out.update(frames=frames, first_chunk_s=first, total_s=total, fps=frames / total,
               playback_lag_s=lag)


def device_name() -> str:
    """The GPU's name (nvidia-smi), else the CPU's: where the server ran, when it is local."""
    import platform  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        if out:
            return out[0]
    return platform.processor() or platform.machine()


def gpu_memory_mib():
    """Memory in use on the GPU right after the streams (the server still holds it)."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def ar_rounds(metrics_url: str | None) -> int | None:
    """The ar_backbone's decode rounds so far (its ``helios_ar_iterations`` gauge)."""
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("helios_ar_iterations{"):
                return int(float(line.rsplit(" ", 1)[1]))
    return None


def model_stats(stats_url: str | None) -> dict | None:
    """{model: {count, queue_ns, compute_input_ns, compute_infer_ns, compute_output_ns}}."""
    if not stats_url:
        return None
    request = urllib.request.Request(f"http://{stats_url}/v2/models/stats",
                                     headers={"helios-admin": os.environ.get("HELIOS_ADMIN_KEY", "")})
    with urllib.request.urlopen(request, timeout=10) as r:
        body = json.loads(r.read())
    out = {}
    for m in body["model_stats"]:
        st = m["inference_stats"]
        out[m["name"]] = {"count": st["success"]["count"] + st["fail"]["count"],
                          **{f"{k}_ns": st[k]["ns"] for k in ("queue", "compute_input",
                                                               "compute_infer", "compute_output")}}
    return out


def stats_after(stats_url: str | None, before: dict | None, requests: int,
                timeout_s: float = 10.0) -> dict | None:
    """The statistics after a level of ``requests`` streams. Triton counts a decoupled
    request once its last response has been sent, which can be a moment after the client
    holds it: wait (up to ``timeout_s``) until the streaming model counts every one."""
    after = model_stats(stats_url)
    deadline = time.monotonic() + timeout_s
    while (after is not None and before is not None and time.monotonic() < deadline
           and after.get(STREAM_MODEL, {}).get("count", 0)
           < before.get(STREAM_MODEL, {}).get("count", 0) + requests):
        time.sleep(0.1)
        after = model_stats(stats_url)
    return after


def stats_delta(before: dict | None, after: dict | None) -> dict | None:
    """Per model: requests in between and the mean milliseconds of each part per request."""
    if before is None or after is None:
        return None
    out = {}
    for name, a in after.items():
        b = before.get(name, dict.fromkeys(a, 0))
        n = a["count"] - b["count"]
        if n > 0:
            out[name] = {"requests": n, **{k.replace("_ns", "_ms"): (a[k] - b[k]) / n / 1e6
                                           for k in a if k.endswith("_ns")}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("HELIOS_GRPC_URL", "localhost:8001"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--warmup-seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--metrics-url", default=None,
                    help="Triton's metrics endpoint, e.g. http://localhost:8002/metrics")
    ap.add_argument("--config", default=None,
                    help="the served checkpoint's configuration, recorded in the JSON")
    ap.add_argument("--stats-url", default=None,
                    help="Triton's HTTP endpoint for its per-model statistics, e.g. localhost:8000")
    ap.add_argument("--server", default=None,
                    help="how the server was filled (fill_repository's options), recorded in the JSON")
    args = ap.parse_args(argv)
    if args.warmup_seconds > 0:  # not measured; 0 measures a cold server's first requests
        one_stream(args.url, PROMPTS[0], args.warmup_seconds, 99, {})
    rows = []
    for n in args.concurrency:
        results = [dict() for _ in range(n)]
        rounds0, stats0 = ar_rounds(args.metrics_url), model_stats(args.stats_url)
        threads = [threading.Thread(target=one_stream, args=(args.url, PROMPTS[i % len(PROMPTS)],
                                                              args.seconds, i, results[i]))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if "fps" in r]
        rounds1 = ar_rounds(args.metrics_url)
        rows.append({"concurrency": n, "streams": results, "gpu_memory_used_mib": gpu_memory_mib(),
                     "per_model": stats_delta(stats0, stats_after(args.stats_url, stats0, n)),
                     "ar_rounds": None if rounds0 is None else rounds1 - rounds0,
                     "failed": n - len(ok),
                     "fps_min": min((r["fps"] for r in ok), default=float("nan")),
                     "fps_median": statistics.median(r["fps"] for r in ok) if ok else float("nan"),
                     "first_chunk_median_s": statistics.median(r["first_chunk_s"] for r in ok)
                     if ok else float("nan"),
                     "playback_lag_max_s": max((r["playback_lag_s"] for r in ok), default=float("nan"))})
        for r in results:
            if "error" in r:
                print(f"stream failed at concurrency {n}: {r['error']}", file=sys.stderr)
        if args.out:  # after every concurrency level, so that a later failure keeps these
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "client_fps.json").write_text(json.dumps(
                {"date": time.strftime("%Y-%m-%d"), "device": device_name(),
                 "config": args.config, "server": args.server, "seconds": args.seconds,
                 "rows": rows},
                indent=2) + "\n")
    print(f"{'streams':>7} {'FPS per stream (min / median)':>30} {'first chunk median ms':>22} "
          f"{'playback lag ms':>16} {'GPU MiB':>8} {'failed':>6} {'AR rounds':>9}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['fps_min']:>14.2f} / {r['fps_median']:<13.2f} "
              f"{r['first_chunk_median_s'] * 1e3:>22.0f} {r['playback_lag_max_s'] * 1e3:>16.0f} "
              f"{r['gpu_memory_used_mib'] or 0:>8} {r['failed']:>6} "
              f"{r['ar_rounds'] if r['ar_rounds'] is not None else '-':>9}")
    for r in rows:
        if r["per_model"]:
            print(f"\nstreams {r['concurrency']}: per model, mean ms per request")
            print(f"{'model':<16} {'requests':>8} {'queue':>8} {'input':>8} {'execute':>9} "
                  f"{'output':>8}")
            for name, m in sorted(r["per_model"].items()):
                print(f"{name:<16} {m['requests']:>8} {m['queue_ms']:>8.2f} "
                      f"{m['compute_input_ms']:>8.2f} {m['compute_infer_ms']:>9.2f} "
                      f"{m['compute_output_ms']:>8.2f}")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

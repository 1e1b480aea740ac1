"""perf_analyzer (tritonclient[all]==2.51.0) against ``helios`` in gRPC streaming mode.

    python benchmarks/perf_analyzer.py --url localhost:8001 --out benchmarks/results/perf \\
        --concurrency 1:4:1 --input-data benchmarks/perf_input.json

Writes perf_analyzer's CSV (``perf.csv``) and its profile export (``profile.json``) into --out,
and prints a table. In streaming mode one "inference" is a whole video request: the
throughput column counts videos per second, latency is request sent -> final response, and
the time to the first chunk is in the profile export (the first response of each request).

perf_analyzer links libb64.so.0d and libcudart.so.12. The nvidia-pytriton wheel carries both
(under hashed names), so they are linked under their usual names into .triton/perf-libs and no
system package is needed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from helios_triton.server import admin_header

ROOT = Path(__file__).resolve().parents[1]


def perf_env() -> dict:
    spec = importlib.util.find_spec("pytriton")
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    dest = ROOT / ".triton" / "perf-libs"
    dest.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        (src,) = libs.glob(pattern)
        link = dest / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(dest), env.get("LD_LIBRARY_PATH")) if p)
    return env


def first_response_ms(profile: Path) -> list[float]:
    """Per request: first response time - send time, from perf_analyzer's profile export."""
    data = json.loads(profile.read_text())
    out = []
    for experiment in data.get("experiments", []):
        for req in experiment.get("requests", []):
            if req.get("response_timestamps"):
                out.append((req["response_timestamps"][0] - req["timestamp"]) / 1e6)
    return out


def _frames_per_video(input_data: Path) -> float:
    data = json.loads(input_data.read_text())["data"]
    return statistics.mean(d["NUM_FRAMES"][0] for d in data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("HELIOS_GRPC_URL", "localhost:8001"))
    ap.add_argument("--admin-key", default=os.environ.get("HELIOS_ADMIN_KEY"),
                    help="the server's admin key: perf_analyzer reads the server-side "
                         "statistics, a restricted API (helios_triton.server sets "
                         "HELIOS_ADMIN_KEY for --run)")
    ap.add_argument("--model", default="helios")
    ap.add_argument("--concurrency", default="1:4:1", help="start:end:step")
    ap.add_argument("--input-data", type=Path, default=ROOT / "benchmarks" / "perf_input.json")
    ap.add_argument("--requests-per-window", type=int, default=8)
    ap.add_argument("--stability", type=int, default=100,
                    help="percent by which windows may differ (perf_analyzer's default is 10; "
                         "a busy 2-core CPU needs more)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf")
    args = ap.parse_args(argv)
    exe = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    if exe is None:
        raise SystemExit("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0'")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, profile = args.out / "perf.csv", args.out / "profile.json"
    cmd = [exe, "-m", args.model, "-i", "grpc", "-u", args.url, "--streaming",
           "--input-data", str(args.input_data), "--concurrency-range", args.concurrency,
           "--measurement-mode", "count_windows",
           "--measurement-request-count", str(args.requests_per_window),
           "--stability-percentage", str(args.stability), "--max-trials", "6",
           "-f", str(csv_path), "--profile-export-file", str(profile), "--verbose-csv"]
    if args.admin_key:
        cmd += ["-H", admin_header(args.admin_key, "grpc")]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=perf_env())
    if rc != 0:
        return rc
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    firsts = first_response_ms(profile) if profile.exists() else []
    # Latency is request sent -> final response (the whole video); first chunks: profile.json.
    print(f"\n{'concurrency':>11} {'videos/s':>9} {'frames/s':>9} {'video p50 ms':>19} "
          f"{'p99 ms':>9}")
    frames = _frames_per_video(args.input_data)
    for r in sorted(rows, key=lambda r: int(r["Concurrency"])):
        videos = float(r["Inferences/Second"])
        print(f"{r['Concurrency']:>11} {videos:>9.2f} {videos * frames:>9.1f} "
              f"{float(r['p50 latency']) / 1000:>19.1f} {float(r['p99 latency']) / 1000:>9.1f}")
    if firsts:
        print(f"first chunk over all requests: median {statistics.median(firsts):.1f} ms "
              f"({len(firsts)} requests)")
    print(f"\nwrote {csv_path} and {profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

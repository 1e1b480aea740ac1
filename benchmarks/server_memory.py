"""Where the fused server's GPU memory goes: the pipeline built the way ``--stages fused``
builds it, phase by phase, with the allocator's own account of every segment.

    python benchmarks/server_memory.py --config 14b --max-streams 4 --out results/

The phases are those of the server's load (``helios_triton.stage.load_pipeline`` and
``stream_threads``), on random weights of the real shapes created on the device, or read
from a checkpoint folder as the server reads it (--checkpoint): build (AR steps compiled
and captured for every batch size up to --max-streams), the warm-up video, the stream
threads' warm-up, then --max-streams videos at once, all decoded as the server decodes them
(--speculative, off as benchmarks/gpu.sh fills the server). After each, the table gives
the device's memory in use (``cudaMemGetInfo``, what nvidia-smi reads, this process's CUDA
context and libraries included), the allocator's reserved and allocated bytes, and its peak.
At the end the reserved segments are summed by CUDA stream and memory pool (CUDA graphs
capture into private pools), and the live allocations by the project's source line that
asked for them (``torch.cuda.memory._record_memory_history``).
JSON goes to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from helios.checkpoint import random_components
from helios.config import get_config
from helios.pipeline import HeliosPipeline
from helios_triton.stage import stream_threads, warm_up

MIB = 1 << 20


def reading(device) -> dict:
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"device_in_use_mib": (total - free) / MIB,
            "reserved_mib": torch.cuda.memory_reserved(device) / MIB,
            "allocated_mib": torch.cuda.memory_allocated(device) / MIB,
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB}


def _source(frames) -> str:
    """The innermost frame of the project's own code that led to an allocation."""
    for f in frames:
        name = f.get("filename", "")
        if "/helios/" in name or "/benchmarks/" in name or "/helios_triton/" in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "(outside the project)"


def account(snapshot: dict, top: int = 15) -> dict:
    """Reserved bytes by (stream, pool), live bytes by the source line that allocated them."""
    pools = collections.Counter()
    live = collections.Counter()
    for seg in snapshot["segments"]:
        pool = seg.get("segment_pool_id") or (0, 0)
        key = f"stream {seg.get('stream', 0):#x}, pool {tuple(pool)}"
        pools[key] += seg["total_size"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                live[_source(block.get("frames", []))] += block["size"]
    return {"reserved_by_stream_and_pool_mib": {k: v / MIB for k, v in pools.most_common()},
            "live_by_source_mib": {k: v / MIB for k, v in live.most_common(top)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="14b")
    ap.add_argument("--max-streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each concurrent video")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="load this checkpoint as the server does (default: random weights)")
    ap.add_argument("--ar-fp8", action="store_true")
    ap.add_argument("--refiner-fp8", action="store_true")
    ap.add_argument("--speculative", choices=("on", "off"), default="off",
                    help="decode as a server filled with this --speculative does (gpu.sh's: off)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("server_memory.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = get_config(args.config)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    phases = {}

    def phase(name):  # printed as it is reached: a run cut short still tells where it got
        phases[name] = r = reading(device)
        print(f"{name:<32} {r['device_in_use_mib']:>9.0f} {r['reserved_mib']:>9.0f} "
              f"{r['allocated_mib']:>10.0f} {r['peak_allocated_mib']:>9.0f}", flush=True)

    print(f"{'phase':<32} {'in use':>9} {'reserved':>9} {'allocated':>10} {'peak':>9}  (MiB)")
    phase("empty")
    t0 = time.perf_counter()
    n = args.max_streams
    kw = dict(max_streams=n, shared_ar=n > 1, ar_fp8=args.ar_fp8, refiner_fp8=args.refiner_fp8)
    if args.checkpoint:
        pipe = HeliosPipeline.from_checkpoint(args.checkpoint, device=device,
                                              dtype=torch.bfloat16, **kw)
        cfg = pipe.config
    else:
        parts = random_components(cfg, device, torch.bfloat16)
        phase("weights")
        pipe = HeliosPipeline(cfg, **parts, device=device, **kw)
    phase("built (AR steps captured)")
    spec = args.speculative == "on"
    warm_up(pipe, print, spec)   # the server's own warm-up, threads and their warm-up below
    phase("warm-up video")
    with stream_threads(pipe, print, spec) as pool:
        phase("stream threads warmed up")
        frames = int(args.seconds * cfg.fps)
        for f in [pool.submit(pipe.generate_video, "a red circle moving left", num_frames=frames,
                              seed=i, speculative=spec) for i in range(n)]:
            f.result()
    phase(f"{n} videos of {args.seconds:g} s at once")
    load_s = time.perf_counter() - t0
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if pipe.scheduler is not None:
        pipe.close()

    print(f"{args.config}, max streams {n}{', AR fp8' if args.ar_fp8 else ''}"
          f"{', refiner fp8' if args.refiner_fp8 else ''}: {load_s:.0f} s")
    acc = account(snapshot)
    print("reserved by CUDA stream and pool (MiB):")
    for k, v in acc["reserved_by_stream_and_pool_mib"].items():
        print(f"  {v:>9.0f}  {k}")
    print("live allocations by source (MiB):")
    for k, v in acc["live_by_source_mib"].items():
        print(f"  {v:>9.0f}  {k}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
                  "torch": torch.__version__, "config": args.config, "max_streams": n,
                  "checkpoint": str(args.checkpoint) if args.checkpoint else "random weights",
                  "ar_fp8": args.ar_fp8, "refiner_fp8": args.refiner_fp8,
                  "speculative": args.speculative,
                  "command": "python benchmarks/server_memory.py " + " ".join(argv or sys.argv[1:]),
                  "phases_mib": phases, **acc}
        name = f"server_memory_{args.config}_{n}streams{'_' + args.tag if args.tag else ''}.json"
        (args.out / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

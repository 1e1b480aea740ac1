"""The AR decode step's one-row products in bf16: a Triton-lang GEMV (helios/kernels/gemv.py)
at a sweep of tiles, against cuBLAS, at the 14b AR's weight shapes (GPU).

Each product is timed as the compiled decode step runs it: the 40 layers' weights of that
projection (each layer its own, so nothing is read from L2) in one CUDA graph, replayed; the
time per product is the replay's median over 40. The table gives, per shape, cuBLAS and the
best tiles, each with the bandwidth it reads the weight at and its ratio to the copy floor
(the weight's bytes over the measured device-to-device copy rate); the JSON has every tile.

    python benchmarks/gemv.py --out OUT        prints the table, writes OUT/gemv.json

The JSON's ``best_tiles`` ("NxK": tile) is what ``profile_stages.py --gemv-tiles`` reads.
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8_gemv import about, copy_rate, projections, step_replay_ms  # benchmarks/fp8_gemv.py
from fps import write_result  # benchmarks/fps.py
from helios.config import get_config
from helios.kernels import gemv as kernel


def tiles(n_max: int = 32, k_max: int = 2048):
    """The tiles swept: accumulators of at most 64 float32 registers a thread."""
    for bn, bk, warps in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048),
                                           (2, 4, 8)):
        if bn <= n_max and bk <= k_max and bn * bk // (32 * warps) <= 64 and bk >= 32 * warps:
            yield {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=40)
    args = ap.parse_args(argv)
    c = get_config("14b").ar_backbone
    dev = torch.device("cuda")
    copy = copy_rate(dev)
    print(f"copy rate {copy / 1e12:.2f} TB/s (bytes read plus written)", flush=True)
    by_shape: dict[tuple[int, int], list[str]] = {}  # the products of a shape share its row
    for name, shape in {**projections(c, False), **projections(c, True)}.items():
        by_shape.setdefault(shape, []).append(name)
    rows, best_tiles = [], {}
    for (n, k), names in by_shape.items():
        name = "/".join(names)
        ws = [{name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02}
              for _ in range(args.layers)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0][name].float())
        floor_us = n * k * 2 / copy * 1e6

        def timed(fn, ws=ws):
            return statistics.median(step_replay_ms(fn, {name: x}, ws)) * 1e3 / len(ws)

        us = timed(lambda x_, w: F.linear(x_, w))
        rows.append({"proj": name, "n": n, "k": k, "variant": "cublas", "us": us,
                     "floor_us": floor_us})
        for tile in tiles():
            err = float((kernel.gemv(x, ws[0][name], tile).float() - ref).abs().max()
                        / ref.abs().max())
            us = timed(lambda x_, w, t=tile: kernel.gemv(x_, w, t))
            rows.append({"proj": name, "n": n, "k": k, "variant": "triton", "tile": tile,
                         "us": us, "floor_us": floor_us, "max_rel_error": err})
        mine = [r for r in rows if r["proj"] == name]
        best = min((r for r in mine if r["variant"] == "triton"), key=lambda r: r["us"])
        cub = next(r for r in mine if r["variant"] == "cublas")
        print(f"{name:<28} {n:>6}x{k:<6} floor {floor_us:6.1f} us | cuBLAS {cub['us']:6.1f} us "
              f"({n * k * 2 / cub['us'] / 1e6:.2f} TB/s) | best tile {best['us']:6.1f} us "
              f"({n * k * 2 / best['us'] / 1e6:.2f} TB/s, {best['us'] / floor_us:.2f}x) "
              f"{best['tile']}, error {best['max_rel_error']:.1e}", flush=True)
        best_tiles[f"{n}x{k}"] = best["tile"]
        ranked = sorted((r for r in mine if r["variant"] == "triton"), key=lambda r: r["us"])
        print("   next: " + "; ".join(f"{r['us']:.1f} {r['tile']}" for r in ranked[1:4]))
        del ws
        torch.cuda.empty_cache()
    result = {**about(dev, "gemv.py", argv), "copy_bytes_per_s": copy, "rows": rows,
              "best_tiles": best_tiles}
    write_result(args.out, "gemv.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

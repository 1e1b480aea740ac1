"""FlashAttention-4's forward at the refiner's shape, at tiles and KV splits other than its own
pick (GPU, with flash_attn.cute installed).

On Hopper with head dim 128 FlashAttention-4 picks 128 x 128 tiles, one CTA of 384 threads per
SM: at 14b 720p (16 heads, 3,600 queries over 888 + 3,600 keys) that is 29 x 16 = 464 CTAs,
3.5 waves on the H200's 132 SMs, so the last wave runs half empty. This times the forward
(`flash_attn.cute.interface._flash_attn_fwd`, on keys and values already in one tensor, as
the refiner passes them) at other tiles and with the keys split in 2 or 3 (more CTAs, then a
combine kernel), as CUDA-graph replays over 4 rotated input sets, each variant's largest
difference from the default pick beside its time. A variant the package refuses (a tile its
kernels do not build) is listed with the error's first line.

    python benchmarks/fa4_tiles.py --out OUT       prints the table, writes OUT/fa4_tiles.json
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

from fp8_gemv import about  # benchmarks/fp8_gemv.py
from fps import ceilings, write_result  # benchmarks/fps.py

SHAPES = {"14b 720p": (1, 16, 3600, 888, 128), "14b 720p x4 streams": (4, 16, 3600, 888, 128)}
# (name, options of _flash_attn_fwd)
VARIANTS = [("default pick (128 x 128)", {}),
            ("tile 128 x 176", {"tile_mn": (128, 176)}),
            ("tile 128 x 192", {"tile_mn": (128, 192)}),
            ("tile 128 x 96", {"tile_mn": (128, 96)}),
            ("tile 192 x 128", {"tile_mn": (192, 128)}),
            ("keys split in 2", {"num_splits": 2}),
            ("keys split in 3", {"num_splits": 3}),
            ("no intra-warpgroup overlap", {"intra_wg_overlap": False})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from flash_attn.cute.interface import _flash_attn_fwd  # noqa: PLC0415 - GPU hosts only

    dev = torch.device("cuda")
    peak = ceilings(dev)["bf16_matmul_flop_per_s"]
    result = {**about(dev, "fa4_tiles.py", argv), "matmul_flop_per_s": peak,
              "sms": torch.cuda.get_device_properties(dev).multi_processor_count, "rows": []}
    print(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s; {result['sms']} SMs")
    print(f"{'shape':<20} {'variant':<28} {'median ms':>10} {'TFLOP/s':>8} {'of peak':>8} "
          f"{'max diff':>9}")
    for label, (b, h, nq, nc, d) in SHAPES.items():
        sets = [[torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
                 for n in (nq, nc + nq, nc + nq)] for _ in range(4)]
        flops = 4 * b * h * nq * (nc + nq) * d
        ref = _flash_attn_fwd(*sets[0])[0]
        for name, opts in VARIANTS:
            row = {"shape": label, "variant": name, "options": {k: list(v) if isinstance(v, tuple)
                                                                else v for k, v in opts.items()}}
            try:
                diff = float((_flash_attn_fwd(*sets[0], **opts)[0].float() - ref.float()).abs().max())
                it = iter(range(10**9))
                ms = triton.testing.do_bench_cudagraph(
                    lambda opts=opts: _flash_attn_fwd(*sets[next(it) % 4], **opts),
                    return_mode="median")
                row.update(ms=ms, tflops=flops / ms / 1e9, of_peak=flops / (ms / 1e3) / peak,
                           max_diff=diff)
                print(f"{label:<20} {name:<28} {ms:>10.3f} {row['tflops']:>8.0f} "
                      f"{row['of_peak']:>8.1%} {diff:>9.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a tile the package does not build
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{label:<20} {name:<28} refused: {row['error'][:90]}", flush=True)
            result["rows"].append(row)
    write_result(args.out, "fa4_tiles.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

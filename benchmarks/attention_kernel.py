"""The custom attention kernel against SDPA over concatenated K/V, at the refiner's shapes.

    python benchmarks/attention_kernel.py --out results/

Median times from triton.testing.do_bench (CUDA events), fresh random bf16 inputs, rotated
over 4 input sets so that the L2 cache does not hold them. FLOPs = 4 B H Nq (Nc + Ns) D;
the ratio is to the bf16 matmul rate measured in the same run.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from helios.kernels.context_attention import context_attention

SHAPES = {"14b 720p": (1, 16, 3600, 888, 128), "14b 720p x4 streams": (4, 16, 3600, 888, 128),
          "480p-like": (1, 16, 1600, 376, 128)}
BACKENDS = {"sdpa cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION,
            "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ a, return_mode="median") / 1e3)
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "matmul_flop_per_s": peak, "rows": []}
    print(f"{'shape':<22} {'variant':<16} {'median ms':>10} {'TFLOP/s':>8} {'of peak':>8}")
    for label, (b, h, nq, nc, d) in SHAPES.items():
        sets = [[torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                 for n in (nq, nc, nc, nq, nq)] for _ in range(4)]
        flops = 4 * b * h * nq * (nc + nq) * d
        it = iter(range(10**9))

        def pick():
            return sets[next(it) % 4]

        variants = {"custom kernel": lambda: context_attention(*pick())}
        for name, backend in BACKENDS.items():
            def run(backend=backend):
                q, kc, vc, ks, vs = pick()
                with sdpa_kernel([backend]):   # includes the concatenation, as the refiner would
                    return F.scaled_dot_product_attention(q, torch.cat([kc, ks], 2), torch.cat([vc, vs], 2))
            variants[name] = run
        for name, fn in variants.items():
            try:
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"{label:<22} {name:<16} unavailable: {str(e)[:60]}")
                continue
            rate = flops / (ms / 1e3)
            results["rows"].append({"shape": label, "variant": name, "ms": ms, "flop_per_s": rate})
            print(f"{label:<22} {name:<16} {ms:>10.3f} {rate / 1e12:>8.0f} {rate / peak:>8.2f}")
        from helios.kernels.context_attention import _context_attention_kernel as k
        print(f"{label:<22} autotuned: {k.best_config}")
    print(f"bf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_kernel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

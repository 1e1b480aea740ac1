"""The custom attention kernel against SDPA over concatenated K/V, at the refiner's shapes.

    python benchmarks/attention_kernel.py --out results/
    git show REV:helios/kernels/context_attention.py > /tmp/previous.py
    python benchmarks/attention_kernel.py --against /tmp/previous.py   # a kernel change, A/B

Where FlashAttention-4 (`flash_attn.cute`, the flash-attn-4 package on CUTLASS's Python DSL)
is installed, it is timed too: once through `helios.attention` (the concatenation, then the
kernel: the refiner's path), once on K/V already in one tensor (the kernel alone).

Median times of CUDA-graph replays (triton.testing.do_bench_cudagraph: the refiner replays
its renders as graphs, and at the small shapes the host's launch time would otherwise be
measured instead of the kernel), random bf16 inputs in the refiner's [B, N, H, D] memory
layout, rotated over 4 input sets so that the L2 cache does not hold them. FLOPs =
4 B H Nq (Nc + Ns) D; the ratio is to the bf16 matmul rate measured in the same run. Every
variant's largest error against float32 SDPA is printed beside its time.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fps import ceilings  # benchmarks/fps.py: the matmul rate every benchmark's ratio uses
from helios import attention
from helios.kernels.context_attention import context_attention

SHAPES = {"14b 720p": (1, 16, 3600, 888, 128), "14b 720p x4 streams": (4, 16, 3600, 888, 128),
          "14b 720p context": (1, 16, 888, 0, 128), "14b 640x384": (1, 16, 960, 264, 128)}
BACKENDS = {"sdpa cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION,
            "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--against", type=Path, default=None,
                    help="another version of helios/kernels/context_attention.py (a file), "
                         "timed beside this one")
    args = ap.parse_args(argv)
    against = None
    if args.against:
        spec = importlib.util.spec_from_file_location("previous_context_attention", args.against)
        against = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(against)
    peak = ceilings(torch.device("cuda"))["bf16_matmul_flop_per_s"]
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "matmul_flop_per_s": peak, "rows": []}
    print(f"{'shape':<22} {'variant':<16} {'median ms':>10} {'TFLOP/s':>8} {'of peak':>8} "
          f"{'max error':>10}")
    for label, (b, h, nq, nc, d) in SHAPES.items():
        sets = [[torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                 for n in (nq, nc, nc, nq, nq)] for _ in range(4)]
        flops = 4 * b * h * nq * (nc + nq) * d
        q, kc, vc, ks, vs = sets[0]
        exact = F.scaled_dot_product_attention(q.float(), torch.cat([kc, ks], 2).float(),
                                               torch.cat([vc, vs], 2).float())
        it = iter(range(10**9))
        variants = {"custom kernel": context_attention}
        if against is not None:
            variants["--against kernel"] = against.context_attention
        for name, backend in BACKENDS.items():
            def sdpa(q, kc, vc, ks, vs, backend=backend):
                with sdpa_kernel([backend]):   # includes the concatenation, as the refiner would
                    return F.scaled_dot_product_attention(q, torch.cat([kc, ks], 2),
                                                          torch.cat([vc, vs], 2))
            variants[name] = sdpa
        if attention.backend() == "flash_attn.cute":  # installed, on Hopper or Blackwell
            from flash_attn.cute import flash_attn_func  # noqa: PLC0415

            dense = [(q, torch.cat([kc, ks], 2).transpose(1, 2).contiguous(),
                      torch.cat([vc, vs], 2).transpose(1, 2).contiguous())
                     for q, kc, vc, ks, vs in sets]
            def fa4_dense(q, *_, sets=sets, dense=dense):
                _, k, v = dense[next(i for i, s in enumerate(sets) if s[0] is q)]
                return flash_attn_func(q.transpose(1, 2), k, v)[0].transpose(1, 2)
            variants["fa4 + concat"] = attention.context_attention  # the refiner's path
            variants["fa4 dense K/V"] = fa4_dense
        for name, fn in variants.items():
            try:
                error = (fn(*sets[0]).float() - exact).abs().max().item()  # compiles, autotunes
                def timed(fn=fn, sets=sets, it=it):
                    return fn(*sets[next(it) % 4])
                ms = triton.testing.do_bench_cudagraph(timed, rep=300, return_mode="median")
            except (RuntimeError, AssertionError, TypeError) as e:  # a shape it does not take
                print(f"{label:<22} {name:<16} unavailable: {str(e)[:60]}")
                continue
            rate = flops / (ms / 1e3)
            results["rows"].append({"shape": label, "variant": name, "ms": ms, "flop_per_s": rate,
                                    "max_error": error})
            print(f"{label:<22} {name:<16} {ms:>10.3f} {rate / 1e12:>8.0f} {rate / peak:>8.2f} "
                  f"{error:>10.2e}")
        from helios.kernels.context_attention import _context_attention_kernel as k
        print(f"{label:<22} autotuned: {k.best_config}")
    print(f"bf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_kernel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

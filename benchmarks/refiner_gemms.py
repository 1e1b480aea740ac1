"""The refiner's four matrix products at 14b's 720p rows, each in the ways a GPU can run it.

    python benchmarks/refiner_gemms.py --out results/ [--rows 3600]

A 14b render runs 60 of each (3 steps of 20 blocks): the q/k/v projection (2048 -> 6144),
the attention's output projection (2048 -> 2048), fc1 with its tanh GELU (2048 -> 8192) and
fc2 (8192 -> 2048), all with a bias, on 3600 rows (one latent frame's tokens). In a kernel
profile of a render (docs/performance.md) fc2 ran at about 860 TFLOP/s and fc1 at about 650,
with the same FLOPs: the products whose inner dimension is 2048 lose against the one whose
inner dimension is 8192. Each product is timed as:

- ``cuBLAS``: ``F.linear`` (fc1: ``helios::linear_gelu``, the GELU in cuBLASLt's epilogue), as
  the compiled refiner runs it today;
- ``cuBLAS, transposed``: the same product computed as ``W x^T`` (its output transposed),
  which gives cuBLAS the other operand order and so other tiles;
- ``Inductor, Triton templates``: ``torch.compile`` with ``max_autotune`` and the Triton GEMM
  templates alone (the persistent TMA template on), the bias and GELU in the template's
  epilogue: what the fastest Triton-lang kernel Inductor knows reaches;
- ``Inductor, best of cuBLAS and Triton``: the same autotuning with ATen's kernels among the
  choices, as ``max_autotune`` would pick for the refiner;
- ``cuBLASLt #i``: each algorithm cuBLASLt's heuristic offers for the product (``--lt N``
  asks for up to N), called through ``benchmarks/cublaslt.py`` with the bias (and GELU) in
  its epilogue; #0 is the heuristic's own pick, which ``F.linear`` runs. Each row names the
  algorithm's configuration ids and its kernel (from a profile of one call).

Median times of CUDA-graph replays (triton.testing.do_bench_cudagraph), bf16, random inputs,
each against the measured bf16 matrix rate (an 8192^3 product, as benchmarks/fps.py measures
it) and with its largest error against float32. A table, and JSON naming the device.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from cublaslt import Product  # benchmarks/cublaslt.py
from fp8_gemv import about  # benchmarks/fp8_gemv.py
from fps import ceilings, write_result  # benchmarks/fps.py
from helios.refiner import _linear_gelu

SHAPES = (("qkv", 2048, 6144, False), ("proj", 2048, 2048, False),
          ("fc1+GELU", 2048, 8192, True), ("fc2", 8192, 2048, False))


def _reference(x, w, b, gelu: bool):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


def _inductor(gelu: bool, backends: str):
    options = {"max_autotune": True, "max_autotune_gemm_backends": backends,
               "triton.enable_persistent_tma_matmul": True}
    return torch.compile(lambda x, w, b: _reference(x, w, b, gelu), options=options,
                         dynamic=False)


def variants(x, w, b, gelu: bool, inductor: bool, lt: int):
    """(name, fn, output as [rows, out], details) for one product."""
    if gelu:
        cublas = lambda: _linear_gelu(x, w, b)  # noqa: E731
    else:
        cublas = lambda: F.linear(x, w, b)  # noqa: E731
    out = [("cuBLAS (as the refiner runs it)", cublas, False, {})]
    if not gelu:  # cuBLAS's epilogue adds a bias per output column, not per row: no GELU here
        bt = b[:, None]
        out.append(("cuBLAS, transposed (W x^T)", lambda: torch.addmm(bt, w, x.t()), True, {}))
    if inductor:
        triton_only, best = _inductor(gelu, "TRITON"), _inductor(gelu, "ATEN,TRITON")
        out += [("Inductor, Triton templates", lambda: triton_only(x, w, b), False, {}),
                ("Inductor, best of cuBLAS and Triton", lambda: best(x, w, b), False, {})]
    if lt:
        product = Product(x.shape[0], x.shape[1], w.shape[0], x.dtype, gelu)
        for cand in product.candidates(lt):
            details = {"config": cand.config, "workspace": cand.workspace,
                       "waves": cand.waves}
            out.append((f"cuBLASLt #{cand.rank}",
                        functools.partial(product, x, w, b, cand), False, details))
    return out


def kernel_names(fn) -> list[str]:
    """The CUDA kernels one call of fn runs (memsets left out)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith("Memset")] or ["(none)"]


def rows_for(dev, m: int, rate: float, inductor: bool, lt: int) -> list[dict]:
    rows = []
    for name, k, n, gelu in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * k ** -0.5
        b = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) * 0.1
        exact = _reference(x.float(), w.float(), b.float(), gelu)
        flops = 2 * m * k * n
        for variant, fn, transposed, details in variants(x, w, b, gelu, inductor, lt):
            t0 = time.perf_counter()
            try:
                y = fn()
            except Exception as e:  # noqa: BLE001 - a variant the host cannot run is reported
                print(f"{name}: {variant} failed: {type(e).__name__}: {e}", flush=True)
                rows.append({"product": name, "variant": variant, "error": str(e)})
                continue
            build_s = time.perf_counter() - t0
            err = ((y.t() if transposed else y).float() - exact).abs().max().item()
            try:
                ms = do_bench_cudagraph(fn, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001 - e.g. an algorithm refused in a graph
                print(f"{name}: {variant} failed in a CUDA graph: {type(e).__name__}: {e}",
                      flush=True)
                rows.append({"product": name, "variant": variant, "error": str(e)})
                continue
            rows.append({"product": name, "rows": m, "in": k, "out": n, "variant": variant,
                         "ms": ms, "tflop_per_s": flops / ms / 1e9,
                         "of_matrix_rate": flops / (ms / 1e3) / rate, "max_error": err,
                         "first_call_s": build_s, "kernels": kernel_names(fn), **details})
            print(f"{name:<9} {variant:<38} {ms * 1e3:8.1f} us {flops / ms / 1e9:7.0f} TFLOP/s "
                  f"({flops / (ms / 1e3) / rate:5.1%} of the matrix rate), first call "
                  f"{build_s:.1f} s, {rows[-1]['kernels'][0][:60]}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for refiner_gemms.json")
    ap.add_argument("--rows", type=int, nargs="+", default=[3600],
                    help="token rows of a product (default 3600: one 720p latent frame)")
    ap.add_argument("--lt", type=int, default=32,
                    help="time up to this many of cuBLASLt's candidate algorithms (0: none)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="leave out Inductor's autotuned variants (minutes of compiling)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU, and torch sees none")
    dev = torch.device("cuda")
    ceil = ceilings(dev)
    rate = ceil["bf16_matmul_flop_per_s"]
    print(f"measured bf16 matrix rate {rate / 1e12:.0f} TFLOP/s", flush=True)
    rows = [r for m in args.rows
            for r in rows_for(dev, m, rate, not args.no_inductor, args.lt)]
    print(f"\n{'product':<9} {'rows':>6} {'variant':<38} {'median us':>10} {'TFLOP/s':>8} "
          f"{'of rate':>8} {'max error':>10}")
    for r in rows:
        if "ms" not in r:
            continue
        print(f"{r['product']:<9} {r['rows']:>6} {r['variant']:<38} {r['ms'] * 1e3:>10.1f} "
              f"{r['tflop_per_s']:>8.0f} {r['of_matrix_rate']:>8.1%} {r['max_error']:>10.2e}")
    print("\nfastest of each product:")
    for name, *_ in SHAPES:
        timed = [r for r in rows if r["product"] == name and "ms" in r]
        first = next((r for r in timed if r["variant"].startswith("cuBLAS (")), None)
        fastest = min(timed, key=lambda r: r["ms"], default=None)
        if first and fastest:
            print(f"{name:<9} {fastest['variant']:<22} {fastest['ms'] * 1e3:7.1f} us against "
                  f"{first['ms'] * 1e3:7.1f} ({first['ms'] / fastest['ms']:.3f}x): "
                  f"{fastest['kernels'][0][:90]}")
    write_result(args.out, "refiner_gemms.json",
                 {**about(dev, "refiner_gemms.py", argv), "ceilings": ceil, "rows": rows})


if __name__ == "__main__":
    main()

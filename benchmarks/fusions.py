"""Three fusions of the 14b serving path, each timed against the form it replaced.

    python benchmarks/fusions.py --out results/ [--parts mlp,decode-attention,norms]

- The refiner MLP's first projection and its tanh GELU (``helios::linear_gelu``: one
  cuBLASLt matmul with the bias and the GELU in its epilogue) against the matmul followed by
  Inductor's fused bias-and-GELU kernel, at 14b's 720p rows (3600 tokens a latent frame; 14400
  for four streams rendered together).
- The AR decode step's attention over the paged cache (``StaticDecodeView.read``: one SDPA
  call with grouped-query heads) against the float32 products it replaced, compiled as the
  decode step compiles it, at 256 to 1024 cached positions of 14b's AR (40 query heads, 8 KV
  heads, head dim 128).
- The refiner blocks' gated residual add with the layer norm and modulation after it
  (``helios::residual_norm``, helios/kernels/residual_norm.py) against Inductor's fused
  kernel of the same expression, at 14b's width (2048) and 720p's rows (3600 noisy tokens, the
  884 of the context, 14400 for four streams), the kernel at a sweep of rows a program and
  warps; each against the copy rate (its bytes: x and y read, the sum and the norm written).

Median times of CUDA-graph replays (triton.testing.do_bench_cudagraph), bf16, random inputs;
each row prints its largest error against float32. A table, and JSON naming the device.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from fps import ceilings  # benchmarks/fps.py
from helios.kernels.residual_norm import residual_norm
from helios.kv_cache import PagedKVCache, StaticDecodeView
from helios.refiner import _linear_gelu


def _read_float32(view, layer, q):
    """The decode attention before the fusion: keys and values gathered and cast to float32,
    two batched matmuls and a masked softmax."""
    pool_k, pool_v, rows = view._pool()
    bs = view.cache.block_size
    read = layer * rows + view.block_table[:, view._key_block] * bs + view._key_offset
    keys, values = pool_k[read].transpose(1, 2), pool_v[read].transpose(1, 2)
    mask = view._key_pos[None, :] <= view.positions
    b, h, _, d = q.shape
    kvh = keys.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d).float()
    scores = (qg @ keys.float().transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, -1) @ values.float()
    return out.to(q.dtype).view(b, h, 1, d)


def mlp_rows(dev):
    rows = []
    for m in (3600, 14400):
        x = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
        w = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16) * 0.02
        bias = torch.randn(8192, device=dev, dtype=torch.bfloat16) * 0.1
        exact = F.gelu(F.linear(x.float(), w.float(), bias.float()), approximate="tanh")
        unfused = torch.compile(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"))
        for name, fn in (("matmul, then bias+GELU (Inductor)", lambda: unfused(x, w, bias)),
                         ("helios::linear_gelu", lambda: _linear_gelu(x, w, bias)),
                         ("the matmul alone", lambda: x @ w.t())):
            err = (fn().float() - exact).abs().max().item() if "alone" not in name else None
            rows.append({"part": "fc1+GELU", "size": f"{m} x 2048 -> 8192", "variant": name,
                         "ms": do_bench_cudagraph(fn, rep=200, return_mode="median"),
                         "max_error": err})
    return rows


def decode_attention_rows(dev):
    rows = []
    bs, kvh, h, d = 16, 8, 40, 128
    for length in (256, 512, 1024):
        cache = PagedKVCache(2, kvh, d, length // bs + 8, bs, torch.bfloat16, dev)
        cache.k.normal_(), cache.v.normal_()
        cache.add_sequence(0)
        cache.reserve([0], [length * 3 // 4])
        cache.lengths[0] = length * 3 // 4
        view = StaticDecodeView(cache, 1, length // bs)
        view.load([0])
        layer = torch.tensor(1, device=dev)
        q = torch.randn(1, h, 1, d, device=dev, dtype=torch.bfloat16)
        exact = _read_float32(view, layer, q.float().to(torch.bfloat16)).float()
        shipped = torch.compile(lambda q: view.read(layer, q))
        before = torch.compile(lambda q: _read_float32(view, layer, q))
        for name, fn in (("float32 products (before)", lambda: before(q)),
                         ("SDPA, grouped heads (StaticDecodeView.read)", lambda: shipped(q))):
            rows.append({"part": "AR decode attention", "size": f"{length} positions",
                         "variant": name, "ms": do_bench_cudagraph(fn, rep=100, return_mode="median"),
                         "max_error": (fn().float() - exact).abs().max().item()})
    return rows


def _sum_and_norm(x, y, gate, shift, scale):
    s = x + gate * y
    return s, F.layer_norm(s, s.shape[-1:], eps=1e-6) * (1 + scale) + shift


def norm_rows(dev, copy_rate: float):
    rows = []
    inductor = torch.compile(_sum_and_norm)
    d = 2048
    for n, b in ((3600, 1), (884, 1), (3600, 4)):
        x, y = (torch.randn(b, n, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        gate, shift, scale = (m[:, None] for m in (0.5 * torch.randn(
            b, 6 * d, device=dev, dtype=torch.bfloat16)).chunk(6, -1)[2:5])
        _, exact = _sum_and_norm(*(t.float() for t in (x, y, gate, shift, scale)))
        variants = [("Inductor's fused kernel (before)", lambda: inductor(x, y, gate, shift, scale))]
        variants += [(f"helios::residual_norm, {r} rows, {w} warps",
                      lambda r=r, w=w: residual_norm(x, y, gate, shift, scale, 1e-6, r, w))
                     for r in (1, 2, 4, 8) for w in (4, 8, 16) if r * d // (32 * w) >= 4]
        for name, fn in variants:
            ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            rows.append({"part": "residual+norm", "size": f"{b} x {n} x {d}", "variant": name,
                         "ms": ms, "of_copy_rate": 4 * x.numel() * 2 / (ms * 1e-3) / copy_rate,
                         "max_error": (fn()[1].float() - exact).abs().max().item()})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", default="mlp,decode-attention,norms")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    parts = args.parts.split(",")
    rows = mlp_rows(dev) if "mlp" in parts else []
    rows += decode_attention_rows(dev) if "decode-attention" in parts else []
    ceil = ceilings(dev)
    rows += norm_rows(dev, ceil["copy_bytes_per_s"]) if "norms" in parts else []
    print(f"{'part':<20} {'size':<22} {'variant':<45} {'median us':>10} {'max error':>10} "
          f"{'of copy rate':>12}")
    for r in rows:
        err = "" if r["max_error"] is None else f"{r['max_error']:.2e}"
        rate = f"{r['of_copy_rate'] * 100:.1f} %" if "of_copy_rate" in r else ""
        print(f"{r['part']:<20} {r['size']:<22} {r['variant']:<45} {r['ms'] * 1e3:>10.1f} {err:>10} "
              f"{rate:>12}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fusions.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
             "torch": torch.__version__, "ceilings": ceil, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""The AR decode step's matrix-vector products in FP8 against bf16 cuBLAS, at the 14b AR's
shapes (GPU).

Two measurements, for 1 and 4 rows (streams) and a 96-row prefill (`--rows`):

- **one decode step's products**: every projection of all 40 decoder layers (each layer its
  own weights, 22 GB in bf16, 11 GB in e4m3), captured as one CUDA graph and replayed, the way
  the compiled decode step runs them; the median replay, the bandwidth it reaches on the
  weight bytes and its ratio to the copy floor (the weight bytes over the measured
  device-to-device copy rate);
- **one projection**: the same, for each projection of the 40 layers alone (per product).

Variants (``--variants`` picks): ``bf16``, ``F.linear`` on bf16 weights (cuBLAS); ``fp8``,
``helios.fp8.fp8_gemv`` on e4m3 weights, as the AR's FP8 option runs it; ``fp8_dot``, the
same on the tensor cores at one row; ``fp8_dequant``, prefill rows the way they ran before
the kernel took them (the weight dequantized per call, then cuBLAS). Each in two layouts:
the 7 projections of a layer, and q/k/v and gate/up each one matrix (``fuse_projections``,
the layout ``quantize_ar`` gives).

    python benchmarks/fp8_gemv.py --out OUT        prints the tables, writes OUT/fp8_gemv.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fps import write_result  # benchmarks/fps.py
from helios import fp8
from helios.config import get_config

def _dequantized(x, w):
    return F.linear(x, fp8.dequantize(*w, x.dtype))


# name: (product, the row counts it is timed at)
VARIANTS = {
    "bf16": (lambda x, w: F.linear(x, w), lambda m: True),
    "fp8": (lambda x, w: fp8.fp8_gemv(x, *w), lambda m: True),
    "fp8_dot": (lambda x, w: fp8.fp8_gemv(x, *w, fma=False), lambda m: m == 1),
    "fp8_dequant": (_dequantized, lambda m: m > fp8.GEMV_MAX_ROWS),
}


def projections(c, fused: bool) -> dict[str, tuple[int, int]]:
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    if fused:
        return {"qkv_proj": (q + 2 * kv, d), "o_proj": (d, q),
                "gate_up_proj": (2 * c.intermediate_size, d), "down_proj": (d, c.intermediate_size)}
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (c.intermediate_size, d), "up_proj": (c.intermediate_size, d),
            "down_proj": (d, c.intermediate_size)}


def about(dev, script: str, argv) -> dict:
    """What these kernel benchmarks' JSON opens with: the device, the date, torch and triton's
    versions and the command (``script``: the file name under benchmarks/)."""
    return {"device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:])}


def copy_rate(dev) -> float:
    """Bytes read plus written per second of a 4 GiB device-to-device copy (median of 20)."""
    a = torch.empty(2 ** 31, dtype=torch.int16, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    del a, b
    return 2 * 2 ** 32 / (ms / 1e3)


def weights(shapes, layers: int, kind: str, dev):
    """One layer's weights per entry: bf16 tensors, or (e4m3, scale) pairs."""
    out = []
    for _ in range(layers):
        layer = {}
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            layer[name] = w if kind == "bf16" else fp8.quantize_weight(w)
        out.append(layer)
    return out


def step_replay_ms(fn, xs, layer_weights, reps: int = 20) -> list[float]:
    """Every layer's products as one CUDA graph; each replay's time in ms."""
    def step():
        for layer in layer_weights:
            for name, w in layer.items():
                fn(xs[name], w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # autotuning and compilation happen here, outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 96])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    c = get_config("14b").ar_backbone
    dev = torch.device("cuda")
    copy = copy_rate(dev)
    print(f"copy rate {copy / 1e12:.2f} TB/s (bytes read plus written)", flush=True)
    steps, singles = [], []
    for fused in (False, True):
        shapes = projections(c, fused)
        layout = "q/k/v, gate/up fused" if fused else "7 projections"
        for kind in ("bf16", "fp8"):
            variants = [v for v in args.variants if (v == "bf16") == (kind == "bf16")]
            if not variants:
                continue
            ws = weights(shapes, c.num_hidden_layers, kind, dev)
            nbytes = sum(n * k for n, k in shapes.values()) * c.num_hidden_layers * (2 if kind == "bf16" else 1)
            for m in args.rows:
                xs = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                      for name, (n, k) in shapes.items()}
                for v in variants:
                    fn, timed_at = VARIANTS[v]
                    if not timed_at(m):
                        continue
                    ms = statistics.median(step_replay_ms(fn, xs, ws))
                    floor = nbytes / copy * 1e3  # the weights read once at the copy rate
                    row = {"layout": layout, "variant": v, "rows": m, "replay_ms": ms,
                           "weight_gb": nbytes / 1e9, "tb_s": nbytes / (ms / 1e3) / 1e12,
                           "floor_ms": floor, "ratio": ms / floor}
                    steps.append(row)
                    print(f"step  {layout:<22} {v:<5} rows {m}: {ms:6.2f} ms, {row['tb_s']:.2f} TB/s "
                          f"on {row['weight_gb']:.1f} GB, {row['ratio']:.2f}x the floor "
                          f"{floor:.2f} ms", flush=True)
                    for name, (n, k) in shapes.items():  # each projection of all layers alone
                        one = [{name: layer[name]} for layer in ws]
                        us = statistics.median(step_replay_ms(fn, xs, one)) * 1e3 / len(ws)
                        singles.append({"layout": layout, "variant": v, "rows": m, "proj": name,
                                        "n": n, "k": k, "us": us,
                                        "tb_s": n * k * (2 if kind == "bf16" else 1) / us / 1e6})
            del ws
            torch.cuda.empty_cache()
    print(f"\n{'one product, us (40 layers in one graph)':<44}" + "".join(
        f"{v + ' x' + str(m):>12}" for v in args.variants for m in args.rows))
    for layout in dict.fromkeys(r["layout"] for r in singles):
        for proj in dict.fromkeys(r["proj"] for r in singles if r["layout"] == layout):
            got = {(r["variant"], r["rows"]): r["us"] for r in singles
                   if r["layout"] == layout and r["proj"] == proj}
            n, k = next((r["n"], r["k"]) for r in singles if r["proj"] == proj)
            print(f"{proj + f' {n}x{k}':<44}" + "".join(
                f"{got.get((v, m), float('nan')):12.1f}" for v in args.variants for m in args.rows))
    picks = {kernel: {str(key): str(config) for key, config in getattr(fp8, kernel).cache.items()}
             for kernel in ("_fp8_gemv_fma_kernel", "_fp8_gemv_dot_kernel")}
    for kernel, got in picks.items():
        print(f"\n{kernel}: the autotuner's picks (N, K, BLOCK_M, SPLIT_K, dtypes...)")
        for key, config in got.items():
            print(f"  {key}: {config}")
    result = {**about(dev, "fp8_gemv.py", argv), "copy_bytes_per_s": copy, "steps": steps,
              "products": singles, "autotuned": picks}
    write_result(args.out, "fp8_gemv.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

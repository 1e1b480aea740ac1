"""The FP8 decode-step GEMV against bf16 cuBLAS, at the 14b AR's projection shapes (GPU).

For 1 and 4 rows (streams) and every projection of a decoder layer: the median time
(triton.testing.do_bench: L2 flushed between calls, one kernel at a time) of F.linear on bf16
weights and of helios.fp8.fp8_gemv on e4m3 weights, with the bandwidth each reaches on its
weight bytes; the last rows sum one decoder layer. One kernel at a time with a cold L2 is not
how a graph-replayed decode step runs them: benchmarks/fps.py measures that.

    python benchmarks/fp8_gemv.py --out OUT        prints the table, writes OUT/fp8_gemv.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from helios.config import get_config
from helios.fp8 import fp8_gemv, quantize_weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    c = get_config("14b").ar_backbone
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    shapes = {"q_proj": (c.num_attention_heads * hd, d), "k_proj": (c.num_key_value_heads * hd, d),
              "v_proj": (c.num_key_value_heads * hd, d), "o_proj": (d, c.num_attention_heads * hd),
              "gate_proj": (c.intermediate_size, d), "up_proj": (c.intermediate_size, d),
              "down_proj": (d, c.intermediate_size)}
    dev = torch.device("cuda")
    rows = []
    for m in (1, 4):
        total = {"bf16": 0.0, "fp8": 0.0}
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            q, s = quantize_weight(w)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"rows": m, "proj": name, "n": n, "k": k}
            for key, fn, nbytes in (("bf16", lambda: F.linear(x, w), 2 * n * k),
                                    ("fp8", lambda: fp8_gemv(x, q, s), n * k)):
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[f"{key}_us"] = ms * 1e3
                row[f"{key}_tb_s"] = nbytes / (ms / 1e3) / 1e12
                total[key] += ms * 1e3
            rows.append(row)
            print(f"M={m} {name:<9} {n:>6}x{k:<6} bf16 {row['bf16_us']:7.1f} us "
                  f"({row['bf16_tb_s']:.2f} TB/s)  fp8 {row['fp8_us']:7.1f} us ({row['fp8_tb_s']:.2f})",
                  flush=True)
        rows.append({"rows": m, "proj": "layer", **{f"{k}_us": v for k, v in total.items()}})
        print(f"M={m} one layer: bf16 {total['bf16']:.1f} us, fp8 {total['fp8']:.1f} us; "
              f"x{c.num_hidden_layers} layers: bf16 "
              f"{total['bf16'] * c.num_hidden_layers / 1e3:.2f} ms, fp8 "
              f"{total['fp8'] * c.num_hidden_layers / 1e3:.2f} ms")
    result = {"device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_gemv.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

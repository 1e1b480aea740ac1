"""Do a memory-bound and a compute-bound GPU process overlap? (CUDA MPS or not)

The torch runtime of the Triton repository runs the AR backbone (matrix-vector products:
memory-bound) and the refiner (large matrix products: compute-bound) in separate stub
processes. Without MPS the GPU time-slices between their contexts; under MPS their kernels
can share the GPU. This measures it with stand-ins of the two:

    python benchmarks/diag/mps_overlap.py gemv|gemm SECONDS      one worker: prints ms per pass
    bash benchmarks/diag/mps_overlap.sh OUT                      alone, together, together under MPS

gemv: 40 layers' worth of bf16 weights (5120 x 69120: 22 GB in all, as the 14b AR's decode step
reads) times one vector, one pass = one decode step. gemm: 8192^3 bf16 products, 40 per pass
(about 44 TFLOP, a refiner frame's order of work).
"""

import json
import sys
import time

import torch


def main() -> int:
    kind, seconds = sys.argv[1], float(sys.argv[2])
    dev = torch.device("cuda")
    if kind == "gemv":
        w = [torch.randn(69120, 5120, device=dev, dtype=torch.bfloat16) for _ in range(32)]
        x = torch.randn(5120, 1, device=dev, dtype=torch.bfloat16)
        work = lambda: [wi @ x for wi in w]  # noqa: E731
    else:
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        work = lambda: [a @ a for _ in range(40)]  # noqa: E731
    work()
    torch.cuda.synchronize()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        work()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"kind": kind, "passes": len(times),
                      "median_ms": times[len(times) // 2] * 1e3}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# benchmarks/diag/mps_overlap.py in three settings: each worker alone, both at once (contexts
# time-slice), both at once under an MPS daemon of our own. Output: OUT/mps_overlap.txt.
set -uo pipefail
out="${1:?usage: mps_overlap.sh OUT}"; mkdir -p "$out"
cd "$(dirname "$0")/../.."
py="python3 benchmarks/diag/mps_overlap.py"
{
    echo "== alone"; $py gemv 8; $py gemm 8
    echo "== together, no MPS"; $py gemv 10 & $py gemm 10; wait
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
    mkdir -p /tmp/mps/pipe /tmp/mps/log
    nvidia-cuda-mps-control -d && echo "MPS daemon started"
    echo "== together, MPS"; $py gemv 10 & $py gemm 10 & sleep 6
    echo get_server_list | nvidia-cuda-mps-control
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
    wait
    echo quit | nvidia-cuda-mps-control
    tail -5 /tmp/mps/log/control.log
} 2>&1 | tee "$out/mps_overlap.txt"

#!/usr/bin/env bash
# The whole GPU measurement in one command: ceilings, in-process FPS of tiny and 14b with
# speculative decoding off and on, and a profile of AR decode rounds. JSON and logs go to $1.
#   bash benchmarks/run_gpu.sh results/h100-$(date +%F)
set -euo pipefail
out="${1:?usage: run_gpu.sh OUTPUT_FOLDER}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 benchmarks/fps.py --config tiny --device cuda --seconds 2 --out "$out" | tee "$out/fps_tiny.log"
python3 benchmarks/fps.py --config 14b --device cuda --seconds 2 --speculative off --no-cuda-graphs \
    --out "$out" --tag eager | tee "$out/fps_14b_eager.log"
for spec in off on; do
    python3 benchmarks/fps.py --config 14b --device cuda --seconds 2 --speculative "$spec" \
        --out "$out" --tag "spec_$spec" | tee "$out/fps_14b_spec_$spec.log"
done
python3 benchmarks/profile_ar.py --config 14b --rounds 5 > "$out/profile_ar_14b.txt"

#!/usr/bin/env bash
# The 14b configuration through Triton on a GPU machine: random bf16 weights written as a
# checkpoint, the repository filled for CUDA, tritonserver started, then FPS and first-frame
# latency at the client for 1 and 4 concurrent gRPC streams, then perf_analyzer in streaming
# mode at concurrency 1 and 4 (2 s videos). Output (JSON, CSV, logs) in $1.
#   bash benchmarks/triton_gpu.sh OUT [SECONDS]       (FILL_ARGS=--ar-fp8: FP8 AR weights;
#                                                      MPS=0: stage processes time-slice the GPU;
#                                                      OVERLAP_DECODE=off: helios decodes after
#                                                      rendering; PERF=0: no perf_analyzer)
# The server comes from the nvidia-pytriton wheel: either installed, or (on the lent GPU
# machines, which have no internet) the files of .carry/triton-server.tar.xz.
set -euo pipefail
out="${1:?usage: triton_gpu.sh OUT [SECONDS]}"; seconds="${2:-10}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -f .carry/triton-server.tar.xz ] && [ ! -d /tmp/site ]; then
    tar -xJf .carry/triton-server.tar.xz -C /tmp          # -> /tmp/site
    export PYTHONPATH="/tmp/site:$PWD:$PWD/client:${PYTHONPATH:-}"
fi
t0=$(date +%s)
if [ ! -f /tmp/ck14b/model_index.json ]; then   # a second run in the same call reuses it
    python3 -m helios init --config 14b --out /tmp/ck14b --seed 0 --dtype bfloat16 --device cuda
    echo "checkpoint written in $(( $(date +%s) - t0 )) s"
fi
rm -rf /tmp/repo14b
python3 tools/fill_repository.py --checkpoint /tmp/ck14b --out /tmp/repo14b --device cuda \
    --max-streams 4 --speculative off --instance-kind "${INSTANCE_KIND:-auto}" \
    --overlap-decode "${OVERLAP_DECODE:-auto}" ${FILL_ARGS:-} > /dev/null
# A client that is still waiting after CLIENT_LIMIT seconds gets the stubs' stacks dumped.
mps=(); [ "${MPS:-1}" = 0 ] || mps=(--mps)
python3 tools/triton_server.py --repository /tmp/repo14b --log-file "$out/server.log" "${mps[@]}" \
    --ready-timeout "${READY_TIMEOUT:-480}" --run \
    bash benchmarks/diag/run_with_dump.sh "${CLIENT_LIMIT:-400}" bash -c "
    python3 benchmarks/client_fps.py --seconds $seconds --concurrency 1 4 --out $out \
        --metrics-url http://localhost:8002/metrics &&
    { [ \"${PERF:-1}\" = 0 ] || ! command -v perf_analyzer > /dev/null ||
      python3 benchmarks/perf_analyzer.py --concurrency 1:4:3 --requests-per-window 4 \
        --input-data benchmarks/perf_input_gpu.json --out $out/perf; }"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$out/gpu.txt"

#!/usr/bin/env bash
# Issue 5's GPU measurements on a lent GPU machine (no internet), in parts that each fit one
# 10-minute command:
#   bash benchmarks/gpu_session.sh OUT server      GPU kernel tests, then the 14b config through
#                                                  Triton: client FPS / first frame at 1 and 4
#                                                  streams, perf_analyzer (benchmarks/triton_gpu.sh)
#   bash benchmarks/gpu_session.sh OUT inprocess   speculative-decoding costs and --low-vram
#                                                  (benchmarks/fps.py)
#   bash benchmarks/gpu_session.sh OUT speed       in-process 14b: eager vs compiled vs FP8 AR
#                                                  weights (benchmarks/fps.py, VARIANTS=...)
#   bash benchmarks/gpu_session.sh OUT decoupled   which decoupled / BLS response paths the
#                                                  stub survives (benchmarks/diag/)
#   bash benchmarks/gpu_session.sh OUT diag        the tiny model through Triton in variants
#                                                  (DIAG=...), thread stacks of every stub on a stall
#   bash benchmarks/gpu_session.sh OUT all         speed (bf16 and FP8 refiner), inprocess, then server
#                                                  with bf16 and with the FP8 refiner, each into a
#                                                  folder of OUT: the whole measurement in one
#                                                  command (30-40 min on a fresh machine, so
#                                                  not on the lent machines, whose commands stop
#                                                  at 10 min: run the parts there)
# The server needs numpy < 2 (tritonserver 2.51's python backend corrupts BYTES tensors under
# numpy 2), and the machine's Python has numpy 2: a venv whose own site-packages hold numpy
# 1.26 (and tritonclient) from .whl/, with the machine's packages (torch, ...) behind them
# through a .pth file. The Triton server files come from .carry/triton-server.tar.xz.
# What travels is limited to 64 MiB: with the 13 MB checkpoint in the tree, the server part
# fits only with py-spy and tritonclient's duplicate perf_client binary left out of .whl/
# (and perf_analyzer too, 7 MB, if the tree grows further): WHL_DIR names such a trimmed
# folder instead of .whl (session 5: .whl_srv = numpy, python_rapidjson and the tritonclient
# wheel re-zipped without bin/perf_client and bin/perf_analyzer, their RECORD lines removed;
# triton_gpu.sh then skips perf_analyzer unless .carry/perf_analyzer.xz brings it alone).
set -uo pipefail
out="${1:?usage: gpu_session.sh OUT server|speed|inprocess|decoupled|diag|all}"
part="${2:?server|speed|inprocess|decoupled|diag|all}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"   # the script runs from the repository root below
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
if [ "$part" = all ]; then
    VARIANTS="${VARIANTS:-bf16:--profile rf8:--refiner-fp8,--profile}" bash "$self" "$out/speed" speed
    HELIOS_SKIP_TESTS=1 bash "$self" "$out/inprocess" inprocess
    HELIOS_SKIP_TESTS=1 bash "$self" "$out/server_bf16" server
    HELIOS_SKIP_TESTS=1 FILL_ARGS="--refiner-fp8 ${FILL_ARGS:-}" bash "$self" "$out/server_rf8" server
    exit 0
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

server_python() {
    local base; base="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
    python3 -m venv --without-pip /tmp/v
    local own; own="$(/tmp/v/bin/python -c 'import site; print(site.getsitepackages()[0])')"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$own" "${WHL_DIR:-.whl}"/*.whl
    echo "$base" > "$own/machine-packages.pth"
    ln -sf "$own"/bin/* /tmp/v/bin/       # perf_analyzer (tritonclient), py-spy
    tar -xJf .carry/triton-server.tar.xz -C /tmp    # -> /tmp/site/nvidia_pytriton*
    if [ -f .carry/perf_analyzer.xz ]; then   # tritonclient's perf_analyzer alone (xz: 4.7 MB);
        # benchmarks/perf_analyzer.py links its libraries from the server wheel's copies
        python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
            .carry/perf_analyzer.xz /tmp/v/bin/perf_analyzer && chmod +x /tmp/v/bin/perf_analyzer
    fi
    export PYTHONPATH="/tmp/site:$PWD:$PWD/client"
    /tmp/v/bin/python -c 'import numpy, torch; print("server python: numpy", numpy.__version__, "torch", torch.__version__)'
}

if [ "$part" = server ]; then
    [ -n "${HELIOS_SKIP_TESTS:-}" ] || python3 -m pytest -q tests/test_context_attention_kernel.py tests/test_cuda_graphs.py 2>&1 \
        | tail -5 | tee "$out/gpu_tests.txt"
    server_python
    if [ -d .carry/bytes_repo ]; then   # the BYTES round trip that crashed under numpy 2
        timeout 120 /tmp/v/bin/python tools/triton_server.py --repository .carry/bytes_repo \
            --log-file "$out/bytes_server.log" --run /tmp/v/bin/python .carry/bytes_check.py \
            2>&1 | tail -4 | tee "$out/bytes_check.txt"
        grep -h "echo: python" "$out/bytes_server.log" | tail -1
    fi
    if [ -n "${HELIOS_SMOKE:-}" ]; then   # the tiny model on the GPU through Triton first
        /tmp/v/bin/python -m helios init --config tiny --out /tmp/cktiny --seed 0 > /dev/null
        /tmp/v/bin/python tools/fill_repository.py --checkpoint /tmp/cktiny --out /tmp/repotiny \
            --device cuda --max-streams 4 --speculative off --instance-kind "${INSTANCE_KIND:-auto}" > /dev/null
        /tmp/v/bin/python tools/triton_server.py --repository /tmp/repotiny \
            --log-file "$out/tiny_server.log" --run bash benchmarks/diag/run_with_dump.sh "${SMOKE_LIMIT:-120}" \
            /tmp/v/bin/python benchmarks/client_fps.py --seconds 4 --concurrency 1 4 \
            --out "$out/tiny" 2>&1 | tail -12 | tee "$out/tiny_client.txt"
    fi
    PATH="/tmp/v/bin:$PATH" timeout "${HELIOS_TIMEOUT:-420}" bash benchmarks/triton_gpu.sh "$out" "${HELIOS_SECONDS:-10}"
    tail -30 "$out/server.log" > "$out/server_tail.log" 2>/dev/null
elif [ "$part" = decoupled ]; then   # decoupled streams, direct and through BLS (diag/)
    server_python
    timeout 120 /tmp/v/bin/python tools/triton_server.py --repository benchmarks/diag/decoupled_repo \
        --log-file "$out/decoupled_server.log" --run /tmp/v/bin/python benchmarks/diag/decoupled_check.py \
        2>&1 | tee "$out/decoupled.txt"
elif [ "$part" = diag ]; then   # the tiny model through Triton on this machine, variants
    # DIAG="name:device:instance-kind:cuda-graphs ..." ; stacks of every stub on a stall.
    server_python
    /tmp/v/bin/python -m helios init --config tiny --out /tmp/cktiny --seed 0 > /dev/null
    for v in ${DIAG:-cpu:cpu:auto:on gpu:cuda:KIND_GPU:on nographs:cuda:KIND_GPU:off}; do
        IFS=: read -r name device kind graphs <<< "$v"
        rm -rf "/tmp/repo_$name"
        /tmp/v/bin/python tools/fill_repository.py --checkpoint /tmp/cktiny --out "/tmp/repo_$name" \
            --device "$device" --max-streams 4 --speculative off --instance-kind "$kind" > /dev/null
        sed -i "s/key: \"cuda_graphs\" value: { string_value: \"on\" }/key: \"cuda_graphs\" value: { string_value: \"$graphs\" }/" \
            "/tmp/repo_$name/ar_backbone/config.pbtxt"
        echo "== $v"
        t0=$(date +%s)
        PATH="/tmp/v/bin:$PATH" \
        DUMP_FILE="$out/stubs_$name.txt" HELIOS_STACKS_DIR="/tmp/helios-stacks/$name" timeout 200 /tmp/v/bin/python tools/triton_server.py \
            --repository "/tmp/repo_$name" --log-verbose 1 --log-file "$out/diag_$name.log" \
            --run bash benchmarks/diag/run_with_dump.sh "${SMOKE_LIMIT:-45}" /tmp/v/bin/python \
            benchmarks/client_fps.py --seconds 2 --concurrency 1 --out "$out/diag_$name" 2>&1 | tail -4
        echo "   $(( $(date +%s) - t0 )) s"
        for f in /tmp/helios-stacks/"$name"/*.txt; do
            [ "$(wc -l < "$f")" -gt 1 ] && { echo "### $f"; cat "$f"; }
        done > "$out/stacks_$name.txt" 2>/dev/null
    done
elif [ "$part" = speed ]; then   # in-process before/after of the compile and FP8 options
    [ -n "${HELIOS_SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q tests/test_fp8.py tests/test_cuda_graphs.py 2>&1 \
        | tail -4 | tee "$out/gpu_tests.txt"
    for v in ${VARIANTS:-eager:--no-compile compiled:--profile fp8:--ar-fp8}; do
        IFS=: read -r tag flags <<< "$v"
        flags="${flags//,/ }"   # VARIANTS="p4fp8:--plan-tokens=4,--ar-fp8": commas separate flags
        echo "== $tag ($flags)"
        t0=$(date +%s)
        timeout "${VARIANT_LIMIT:-240}" python3 benchmarks/fps.py --config 14b --device cuda \
            --seconds "${HELIOS_SECONDS:-2}" --out "$out" --tag "$tag" $flags > "$out/fps_$tag.txt" 2>&1
        echo "   rc $? in $(( $(date +%s) - t0 )) s"
        grep -v "^ " "$out/fps_$tag.txt" | grep -iv "warn" | tail -14
    done
else
    timeout 200 python3 benchmarks/fps.py --config 14b --device cuda --seconds 2 --speculative on \
        --out "$out" --tag spec_costs 2>&1 | tail -14
    timeout 330 python3 benchmarks/fps.py --config 14b --device cuda --seconds 0.5 --low-vram \
        --out "$out" --tag low_vram 2>&1 | tail -10
fi

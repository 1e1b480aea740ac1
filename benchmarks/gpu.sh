#!/usr/bin/env bash
# The whole GPU measurement of Helios, on any GPU host where the project is installed (or an
# offline bundle of it lies in .offline/: `make offline-bundle` builds one for hosts without
# internet, and this script installs it first). Output, JSON and logs, goes to OUT.
#
#   bash benchmarks/gpu.sh OUT                  what docs/performance.md's status table cites:
#                                               check inprocess server-fused server-384p-fused
#   bash benchmarks/gpu.sh OUT inprocess server one or more parts
#
# Parts (each ran within 10 minutes on an H200 from a cold start; inprocess with four 20 s
# videos is the sum of its runs, taken one by one, about 6 minutes):
#   install     nothing but the set-up every part starts with (the bundle's environment, and
#               FlashAttention-4 where all of .offline-flash is here): for a host that gets
#               its files over several calls
#   check       the GPU tests: attention kernel, CUDA graphs, FP8, the AR's GEMV, the refiner's
#               residual-and-norm kernel (tests/)
#   inprocess   benchmarks/fps.py: 14b bf16; 14b with the plans prefetched, in bf16 and with
#               FP8 AR and refiner; 14b-384p: per-stage medians, each stage against its floor
#               (measured ceilings), FPS, the first frame and its time by stage
#   server      14b (1280x720) through Triton over gRPC streaming: FPS per stream and first
#               chunk at the client for STREAMS concurrent streams (default "1 4 8"), GPU memory,
#               the per-model profile of each, and the prompt-update latency (one stream)
#   server-384p the same for 14b-384p (640x384) at one stream
#   server-fused
#               14b with every stage inside the helios model's process (fill_repository
#               --stages fused): no copies between processes; STREAMS (default "1 4 8") streams,
#               the server filled for the most of them (above 1: batched AR rounds, renders
#               in turn)
#   server-384p-fused
#               one stream of 14b-384p the same way (FILL_ARGS=--prefetch-plans: the AR
#               decodes ahead beside the refiner)
#   kernels     benchmarks/attention_kernel.py and benchmarks/fusions.py: the refiner's
#               attention kernel, the MLP's GELU epilogue and the AR's decode attention,
#               each against the alternatives
#   memory      benchmarks/server_memory.py: the fused server's build at STREAMS (default 4)
#               streams in-process (FILL_ARGS may add --ar-fp8, --refiner-fp8), its memory
#               phase by phase and by allocator pool
#   attention-ab
#               fps.py for 14b three times: the Triton-lang kernel,
#               FlashAttention-4, the kernel again (each stage's median in each; where
#               FlashAttention-4 is installed)
#   tuning-ab   benchmarks/profile_stages.py (AR round and refiner render) with Inductor's
#               kernels as compiled by default, then with its coordinate-descent tuning of
#               their tile sizes (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1; TUNED="0" or "1"
#               runs one of the two)
#   gemv        benchmarks/gemv.py: the AR's one-row bf16 products, a Triton-lang GEMV at a
#               sweep of tiles against cuBLAS, per weight shape
#   overlap-ab  fps.py for 14b with the plans prefetched, each latent frame's decode overlapped
#               with the next one's render (--overlap-decode on, as fps.py does by default on
#               CUDA) or not (off), in turns (OVERLAP, default "0 1 0")
#   pack-ab     fps.py for 14b with the plans prefetched, FlashAttention-4's inputs packed by
#               one kernel (HELIOS_QKV_PACK=1, the default) or by Inductor's passes (0), in
#               turns (PACK, default "1 0 1"; where FlashAttention-4 is installed)
#   rows-ab     the same with each block's q/k/v product written straight into
#               FlashAttention-4's inputs for one stream (HELIOS_QKV_ROWS=1, the default) or
#               made apart and packed (0), in turns (ROWS, default "1 0 1")
#   norm-ab     the same with the refiner blocks' residual adds and norms by one kernel
#               (HELIOS_RESIDUAL_NORM=1, the default) or by Inductor's (0), in turns (NORMS,
#               default "1 0 1")
#   refiner-gemms
#               benchmarks/refiner_gemms.py: the refiner's four matrix products at 720p's rows,
#               cuBLAS as the refiner runs them against Inductor's autotuned Triton templates
#   lt-gemms    the same products against each algorithm cuBLASLt's heuristic offers, timed
#               (benchmarks/cublaslt.py), without Inductor's
#   fa4-tiles   benchmarks/fa4_tiles.py: FlashAttention-4's forward at the refiner's shape at
#               other tiles and KV splits than its own pick (needs .offline-flash carried)
#   search-ab   profile_stages.py's AR step compiled from an empty Inductor cache with the
#               tuning's default search and a wider one, in turns (SEARCH)
#   profile     benchmarks/profile_stages.py: the AR round, the refiner render and the VAE
#               decoder, kernel by kernel (PROFILE_PARTS, default "ar,refiner,vae";
#               "refiner,refiner-unpacked,refiner" times the render with FlashAttention-4's
#               inputs packed by one kernel and by Inductor's passes, in turns;
#               "refiner,refiner-unnormed,refiner" its residual adds and norms so;
#               "refiner,refiner-unrowed,refiner" its q/k/v product written into
#               FlashAttention-4's inputs or made apart; "refiner,refiner-mods-replayed,
#               refiner" its modulation rows made once at the capture or in each replay)
#   partition   benchmarks/sm_partition.py: a latent frame's render and decode steps at once,
#               the GPU's SMs split between them (green contexts; AR_SMS, default "16,32,48"),
#               against two plain streams
#   fp8         benchmarks/fp8_gemv.py (the AR decode step's products in e4m3 against bf16),
#               then fps.py for 14b with FP8 AR weights, and with the FP8 refiner as well
#
# Knobs: VIDEO_SECONDS (client videos, default 20), FPS_SECONDS (fps.py's videos, default 20),
# STREAMS, SWITCH_EVERY (seconds of video between prompt updates, default 2),
# FILL_ARGS (extra options of helios_triton.fill_repository, e.g. --refiner-fp8),
# MPS=0 (no CUDA MPS for the server),
# EXTRA_SITE (site folders of more packages), HELIOS_FLASH_ATTENTION=0 (the Triton-lang
# attention kernel where FlashAttention-4 is installed), LOGS_TAR=1 (at the end, every file
# of OUT but the JSON goes into OUT/logs.tar.gz: for a host that sends back few files).
#
# FlashAttention-4 on a host without internet: `make offline-flash` packs it in parts of 40 MiB
# (.offline-flash/); where one copy to the host cannot take them all, carry them in turns to
# the same machine: this script installs it once install.sh and every part are there.
set -uo pipefail
out="${1:?usage: gpu.sh OUT [check|inprocess|server|server-384p ...]}"; shift
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(check inprocess server-fused server-384p-fused)
mkdir -p "$out"; out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

[ -f /tmp/helios-env/activate.sh ] && source /tmp/helios-env/activate.sh  # an earlier run's
if ! python3 -c 'import helios_triton, helios_client' 2>/dev/null; then
    if [ -f .offline/install.sh ]; then
        bash .offline/install.sh /tmp/helios-env || exit 1
        # shellcheck disable=SC1091
        source /tmp/helios-env/activate.sh
    else
        echo "gpu.sh: the project is not installed here (pip install . ./client nvidia-pytriton," \
             "or make offline-bundle and carry .offline)" >&2
        exit 2
    fi
fi
if [[ "$(command -v python3)" == /tmp/helios-env/* ]]; then
    # The bundle's environment: Triton's python-backend stubs run an isolated interpreter
    # that ignores PYTHONPATH (docs/serving.md) and import the project from the
    # environment's own site-packages, so the bundle's wheels would run there although the
    # tree has changed since. The tree's packages (pure Python) take their place.
    own="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
    for pkg in helios helios_triton client/helios_client; do
        rm -rf "${own:?}/$(basename "$pkg")"; cp -r "$pkg" "$own/"
    done
    # FlashAttention-4 (make offline-flash), where every part of it was carried here.
    if [ -f .offline-flash/install.sh ] && [ ! -d /tmp/helios-flash ]; then
        bash .offline-flash/install.sh /tmp/helios-flash || exit 1
    fi
    [ -d /tmp/helios-flash ] && EXTRA_SITE="/tmp/helios-flash${EXTRA_SITE:+:$EXTRA_SITE}"
    # EXTRA_SITE: more site folders (':'-separated), seen by every process of the environment,
    # the stubs included, through a .pth file (which also runs the folders' own .pth files).
    rm -f "$own/helios-extra-site.pth"
    IFS=: read -ra extra <<< "${EXTRA_SITE:-}"
    for d in "${extra[@]}"; do
        echo "import site; site.addsitedir('$d')" >> "$own/helios-extra-site.pth"
    done
fi
python3 -c 'from helios import attention; print("refiner attention:", attention.backend())' |
    tee "$out/attention.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

server_run() {  # server_run TAG CONFIG STREAMS...
    local tag="$1" config="$2"; shift 2
    local dir="$out/$tag"; mkdir -p "$dir"
    local t0; t0=$(date +%s)
    [ -f "/tmp/ck-$config/model_index.json" ] ||
        python3 -m helios init --config "$config" --out "/tmp/ck-$config" --seed 0 \
            --dtype bfloat16 --device cuda > /dev/null || return 1
    echo "$tag: checkpoint ready in $(( $(date +%s) - t0 )) s"
    local streams=("$@") max=1
    for n in "${streams[@]}"; do [ "$n" -gt "$max" ] && max=$n; done
    local fill="--max-streams $max --speculative off ${FILL_ARGS:-}"
    # shellcheck disable=SC2086  # the options are words
    python3 -m helios_triton.fill_repository --checkpoint "/tmp/ck-$config" \
        --out "/tmp/repo-$config" --device cuda $fill > /dev/null || return 1
    local mps=(); [ "${MPS:-1}" = 0 ] || mps=(--mps)
    # Against the one server: FPS, first chunk and the per-model profile for each number of
    # streams, then the time a prompt update takes to show (one stream).
    python3 -m helios_triton.server --repository "/tmp/repo-$config" --log-file "$dir/server.log" \
        "${mps[@]}" --ready-timeout 480 --run bash -c '
            seconds=$1 config=$2 dir=$3 fill=$4; shift 4
            python3 benchmarks/client_fps.py --seconds "$seconds" --concurrency "$@" \
                --config "$config" --server "$fill" --metrics-url http://localhost:8002/metrics \
                --stats-url localhost:8000 --out "$dir"; a=$?
            python3 benchmarks/switch_latency.py --seconds "$seconds" --config "$config" \
                --every "${SWITCH_EVERY:-2}" --server "$fill" --server-log "$dir/server.log" \
                --out "$dir"; b=$?
            nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv \
                > "$dir/gpu_processes.csv"; nvidia-smi > "$dir/nvidia_smi.txt"
            exit $(( a | b ))' _ "${VIDEO_SECONDS:-20}" "$config" "$dir" "$fill" "${streams[@]}"
    local rc=$?
    echo "$tag: rc $rc in $(( $(date +%s) - t0 )) s"
    tail -40 "$dir/server.log" > "$dir/server_tail.log" 2>/dev/null
    # How the server stopped: a stub that crashed on its way out prints "Fatal Python error"
    # (faulthandler, helios_triton.stub.process_settings); Triton's exit timeout running out
    # leaves "failed to stop server".
    echo "$tag: at stop, $(grep -c "Fatal Python error" "$dir/server.log") stub crash(es)," \
         "$(grep -c "successfully unloaded" "$dir/server.log") model(s) unloaded," \
         "$(grep -c "failed to stop server" "$dir/server.log") exit timeout(s)"
    return $rc
}

fps_run() {  # fps_run CONFIG TAG LINES [FLAGS...]: benchmarks/fps.py, its last LINES lines shown
    local config="$1" tag="$2" lines="$3"; shift 3
    local log="$out/fps_${config}_$tag.txt"
    timeout 300 python3 benchmarks/fps.py --config "$config" --device cuda --seconds "${FPS_SECONDS:-20}" \
        --out "$out/inprocess" --tag "$tag" "$@" > "$log" 2>&1
    local rc=$?
    echo "fps.py $config $tag: rc $rc"
    grep -v "^ " "$log" | grep -iv "warn" | tail -"$lines"
    return $rc
}

kernel_run() {  # kernel_run NAME SECONDS LINES [ARGS...]: benchmarks/NAME.py --out OUT/kernels
    local name="$1" limit="$2" lines="$3"
    shift 3
    timeout "$limit" python3 "benchmarks/$name.py" --out "$out/kernels" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "$name.py: rc $rc"
    grep -iv "warn" "$out/$name.txt" | tail -"$lines"
    return $rc
}

status=0 runs=0
for part in "${parts[@]}"; do
    echo "== $part"
    case "$part" in
        install) ;;
        check)
            timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_context_attention_kernel.py \
                tests/test_cuda_graphs.py tests/test_fp8.py tests/test_gemv.py \
                tests/test_residual_norm_kernel.py 2>&1 | tail -8 | tee "$out/gpu_tests.txt"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        inprocess)
            fps_run 14b bf16 15 || status=1
            fps_run 14b prefetch 15 --prefetch-plans || status=1
            fps_run 14b prefetch_ar_refiner_fp8 17 --prefetch-plans --ar-fp8 --refiner-fp8 ||
                status=1
            fps_run 14b-384p bf16 15 || status=1 ;;
        attention-ab)
            # The kernel, FlashAttention-4, the kernel again, over 20 s videos: the two A/Bs so
            # far read the stages that FlashAttention-4 does not touch slower in its run, which
            # came first each time; the second kernel run tells the order from the package.
            HELIOS_FLASH_ATTENTION=0 fps_run 14b kernel_first 12 || status=1
            HELIOS_FLASH_ATTENTION=1 fps_run 14b fa4 12 || status=1
            HELIOS_FLASH_ATTENTION=0 fps_run 14b kernel_last 12 || status=1 ;;
        overlap-ab)
            # fps.py with the plans prefetched, the decodes overlapped with the next render or
            # not, in the order of OVERLAP (default "0 1 0": the first run on a fresh machine
            # has read slower before, so the plain one runs on both sides).
            for o in ${OVERLAP:-0 1 0}; do
                flags=(--prefetch-plans --overlap-decode off)
                [ "$o" = 1 ] && flags=(--prefetch-plans --overlap-decode on)
                fps_run 14b "overlap_${o}_$((++runs))" 12 "${flags[@]}" || status=1
            done ;;
        pack-ab)
            # fps.py with the plans prefetched, FlashAttention-4's inputs packed by
            # helios/kernels/qkv_pack.py or made by Inductor's passes, in the order of PACK
            # (default "1 0 1").
            for p in ${PACK:-1 0 1}; do
                HELIOS_QKV_PACK="$p" fps_run 14b "pack_${p}_$((++runs))" 12 --prefetch-plans ||
                    status=1
            done ;;
        rows-ab)
            # fps.py with the plans prefetched, each block's q/k/v product written into
            # FlashAttention-4's inputs (HELIOS_QKV_ROWS=1) or made apart and packed (0), in the
            # order of ROWS (default "1 0 1").
            for r in ${ROWS:-1 0 1}; do
                HELIOS_QKV_ROWS="$r" fps_run 14b "rows_${r}_$((++runs))" 12 --prefetch-plans ||
                    status=1
            done ;;
        norm-ab)
            # fps.py with the plans prefetched, the refiner blocks' residual adds and norms by
            # helios/kernels/residual_norm.py or by Inductor's kernels, in the order of NORMS
            # (default "1 0 1").
            for n in ${NORMS:-1 0 1}; do
                HELIOS_RESIDUAL_NORM="$n" fps_run 14b "norm_${n}_$((++runs))" 12 --prefetch-plans ||
                    status=1
            done ;;
        tuning-ab)
            for tuned in ${TUNED:-0 1}; do
                TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=$tuned timeout 290 python3 \
                    benchmarks/profile_stages.py --config 14b --parts "${PROFILE_PARTS:-ar,refiner}" \
                    --out "$out/tuning_$tuned" > "$out/tuning_$tuned.txt" 2>&1 || status=1
                echo "-- coordinate-descent tuning $tuned"
                grep -iv "warn" "$out/tuning_$tuned.txt" | tail -40
            done ;;
        search-ab)
            # The AR step compiled afresh (an empty Inductor cache each time, as on a new
            # machine) with the coordinate-descent search as by default (radius 1, the
            # directions one by one) and widened (radius 2, all directions together), in
            # turns: SEARCH, default "default wide default wide". A wide run did not finish
            # compiling the step's two layouts within its 290 s on an H200 (2026-12-03).
            i=0
            for v in ${SEARCH:-default wide default wide}; do
                i=$((i + 1))
                env=(TORCHINDUCTOR_CACHE_DIR="/tmp/inductor-search-$i")
                [ "$v" = wide ] && env+=(TORCHINDUCTOR_COORDINATE_DESCENT_RADIUS=2
                                         TORCHINDUCTOR_COORDINATE_DESCENT_CHECK_ALL_DIRECTIONS=1)
                env "${env[@]}" timeout 290 python3 benchmarks/profile_stages.py --config 14b \
                    --parts ar --out "$out/search_${i}_$v" > "$out/search_${i}_$v.txt" 2>&1 ||
                    status=1
                echo "-- $i: $v search"
                grep -E "decode round|kernels|x40 " "$out/search_${i}_$v.txt" | grep -iv warn
            done ;;
        profile)
            timeout 420 python3 benchmarks/profile_stages.py --config 14b \
                --parts "${PROFILE_PARTS:-ar,refiner,vae}" --out "$out/profile" \
                > "$out/profile_stages.txt" 2>&1 || status=1
            grep -iv "warn" "$out/profile_stages.txt" | tail -60 ;;
        partition)
            timeout 480 python3 benchmarks/sm_partition.py --config 14b \
                --ar-sms "${AR_SMS:-16,32,48}" --out "$out/partition" \
                > "$out/sm_partition.txt" 2>&1 || status=1
            grep -iv "warn" "$out/sm_partition.txt" | tail -24 ;;
        fp8)
            kernel_run fp8_gemv 240 30 || status=1
            fps_run 14b ar_fp8 14 --ar-fp8 || status=1
            fps_run 14b ar_refiner_fp8 14 --ar-fp8 --refiner-fp8 || status=1 ;;
        memory)
            opts=()  # the FP8 options of FILL_ARGS, as the server would be filled
            for w in ${FILL_ARGS:-}; do
                case "$w" in --ar-fp8|--refiner-fp8) opts+=("$w") ;; esac
            done
            timeout 300 python3 benchmarks/server_memory.py --config 14b \
                --max-streams "${STREAMS:-4}" --out "$out/memory" "${opts[@]}" \
                > "$out/server_memory.txt" 2>&1 || status=1
            grep -iv "warn" "$out/server_memory.txt" | tail -34 ;;
        kernels)
            kernel_run attention_kernel 300 24 || status=1
            kernel_run fusions 300 24 || status=1 ;;
        gemv)
            kernel_run gemv 420 24 || status=1 ;;
        fa4-tiles)
            kernel_run fa4_tiles 400 24 || status=1 ;;
        refiner-gemms)
            kernel_run refiner_gemms 500 22 --lt 0 || status=1 ;;
        lt-gemms)
            kernel_run refiner_gemms 300 12 --no-inductor --lt 32 || status=1 ;;
        server)
            # shellcheck disable=SC2086  # STREAMS is a list
            server_run server_14b 14b ${STREAMS:-1 4 8} || status=1 ;;
        server-384p)
            server_run server_14b-384p 14b-384p 1 || status=1 ;;
        server-fused)
            # shellcheck disable=SC2086  # STREAMS is a list
            FILL_ARGS="${FILL_ARGS:-} --stages fused" server_run server_14b_fused 14b ${STREAMS:-1 4 8} ||
                status=1 ;;
        server-384p-fused)
            FILL_ARGS="${FILL_ARGS:-} --stages fused" server_run server_14b-384p_fused 14b-384p 1 ||
                status=1 ;;
        *)
            echo "gpu.sh: unknown part $part (install, check, inprocess, server, server-384p," \
                 "server-fused, server-384p-fused, memory, kernels, fp8, attention-ab, tuning-ab," \
                 "profile, partition, gemv, search-ab, fa4-tiles, overlap-ab, pack-ab, rows-ab, norm-ab," \
                 "refiner-gemms, lt-gemms)" >&2
            exit 2 ;;
    esac
done
if [ "${LOGS_TAR:-0}" = 1 ]; then
    # The logs and tables in one file, the JSON beside it: a lent host that returns at most
    # 8 files lost two server runs' JSON among their 14 files.
    (cd "$out" && find . -type f ! -name '*.json' ! -name logs.tar.gz -print0 |
        tar czf logs.tar.gz --null -T - --remove-files)
fi
exit $status

#!/bin/sh
# Container entrypoint: fill the model repository for the mounted checkpoint, then become the
# supervised server (exec: helios_triton.server is PID 1 and gets SIGTERM directly, so it can
# refuse new streams and let running ones finish).
# It writes only under HELIOS_STATE_DIR, so the image runs as any uid on a read-only root.
#   HELIOS_CHECKPOINT     checkpoint folder (default: the trained tiny one baked into the CPU image)
#   HELIOS_FILL_ARGS      options of helios_triton/fill_repository.py, e.g. "--device cuda --max-streams 4"
#   HELIOS_EXIT_TIMEOUT_S seconds running streams get after SIGTERM (keep it below the pod's
#                         terminationGracePeriodSeconds)
#   HELIOS_STATE_DIR      writable folder for the filled repository, logs and caches (/tmp/helios)
#   HELIOS_COMPILE_CACHE_DIR
#                         a folder that outlives the pod for the compilers' caches (Inductor's
#                         graphs and kernel picks, Triton-lang's binaries): a new pod on the
#                         same GPU model and image then loads its compiled kernels instead of
#                         compiling them (default: under HELIOS_STATE_DIR, gone with the pod)
#   HELIOS_HOME           the installed tree with model_repository/ and weights/ (/opt/helios)
#   HELIOS_PORTS          "HTTP GRPC METRICS" ports (default "8000 8001 8002")
set -eu
home="${HELIOS_HOME:-/opt/helios}"
state="${HELIOS_STATE_DIR:-/tmp/helios}"
CHECKPOINT="${HELIOS_CHECKPOINT:-$home/weights/helios-tiny}"
if [ ! -f "$CHECKPOINT/model_index.json" ]; then
    echo "helios: no checkpoint at $CHECKPOINT (mount one or set HELIOS_CHECKPOINT)" >&2
    exit 2
fi
mkdir -p "$state/home"
# A writable HOME of our own, for what writes under it.
export HOME="$state/home"
# The compilers' caches: where HELIOS_COMPILE_CACHE_DIR says, else in the pod's state. A
# cache folder that cannot be written (a volume mounted read-only, or owned by another user)
# costs a pod its compiles' reuse, not its start: it is reported and the state's folder used.
cache="${HELIOS_COMPILE_CACHE_DIR:-$state/compile-cache}"
if ! mkdir -p "$cache/inductor" "$cache/triton" 2>/dev/null ||
        [ ! -w "$cache/inductor" ] || [ ! -w "$cache/triton" ]; then
    echo "helios: HELIOS_COMPILE_CACHE_DIR $cache is not writable;" \
         "compiling into $state/compile-cache instead" >&2
    cache="$state/compile-cache"
    mkdir -p "$cache/inductor" "$cache/triton"
fi
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
# shellcheck disable=SC2086  # HELIOS_FILL_ARGS and HELIOS_PORTS are lists
set -- ${HELIOS_PORTS:-8000 8001 8002}
# shellcheck disable=SC2086
python3 -m helios_triton.fill_repository --checkpoint "$CHECKPOINT" \
    --templates "$home/model_repository" --out "$state/model_repository" ${HELIOS_FILL_ARGS:-}
exec python3 -m helios_triton.server --state-dir "$state" \
    --http-port "$1" --grpc-port "$2" --metrics-port "$3" \
    --exit-timeout-secs "${HELIOS_EXIT_TIMEOUT_S:-570}"

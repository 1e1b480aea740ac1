#!/bin/sh
# Container entrypoint: fill the model repository for the mounted checkpoint, then become
# tritonserver (exec: it is PID 1 and gets SIGTERM directly, so running streams can finish).
#   HELIOS_CHECKPOINT     checkpoint folder (default: the trained tiny one baked into the CPU image)
#   HELIOS_FILL_ARGS      options of helios_triton/fill_repository.py, e.g. "--device cuda --max-streams 4"
#   HELIOS_EXIT_TIMEOUT_S seconds running streams get after SIGTERM (keep it below the pod's
#                         terminationGracePeriodSeconds)
set -eu
CHECKPOINT="${HELIOS_CHECKPOINT:-/opt/helios/weights/helios-tiny}"
if [ ! -f "$CHECKPOINT/model_index.json" ]; then
    echo "helios: no checkpoint at $CHECKPOINT (mount one or set HELIOS_CHECKPOINT)" >&2
    exit 2
fi
# shellcheck disable=SC2086  # HELIOS_FILL_ARGS is a list of options
python3 -m helios_triton.fill_repository --checkpoint "$CHECKPOINT" \
    --templates /opt/helios/model_repository --out /tmp/model_repository ${HELIOS_FILL_ARGS:-}
exec python3 -m helios_triton.server --repository /tmp/model_repository \
    --exit-timeout-secs "${HELIOS_EXIT_TIMEOUT_S:-570}"

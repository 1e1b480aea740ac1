#!/usr/bin/env bash
# run_with_dump.sh SECONDS CMD...: run CMD; if it outlives SECONDS, make every Python process
# of the Triton stubs print its thread stacks (SIGUSR2, see sitecustomize.py), then stop CMD.
limit="$1"; shift
"$@" &
pid=$!
for _ in $(seq "$limit"); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
    sleep 1
done
echo "run_with_dump: still running after $limit s; dumping stub stacks" >&2
pkill -USR2 -f triton_python_backend_stub
sleep 3
kill "$pid" 2>/dev/null
wait "$pid"
exit 124

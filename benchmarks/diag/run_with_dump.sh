#!/usr/bin/env bash
# run_with_dump.sh SECONDS CMD...: run CMD; if it outlives SECONDS, dump what every Triton
# python-backend stub is doing, then stop CMD: the Python stacks of all threads (SIGUSR2 ->
# helios.serving.enable_stack_dumps, armed by HELIOS_STACKS_DIR), and where py-spy is on PATH,
# its native + Python stacks (needs ptrace), with each stub's model and thread states.
limit="$1"; shift
"$@" &
pid=$!
for _ in $(seq "$limit"); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
    sleep 1
done
echo "run_with_dump: still running after $limit s; dumping stub stacks" >&2
for stub in $(pgrep -f triton_python_backend_stub); do
    echo "### stub $stub: $(tr '\0' ' ' < /proc/"$stub"/cmdline | cut -c1-200)"
    for t in /proc/"$stub"/task/*; do
        echo "  thread ${t##*/} $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan" 2>/dev/null) $(cat "$t/comm")"
    done | sort -k3 | uniq -c -f2 | head -20
    command -v py-spy > /dev/null && timeout 20 py-spy dump --native --pid "$stub" 2>&1 | head -150
done > "${DUMP_FILE:-/tmp/helios-stubs.txt}" 2>&1
pkill -USR2 -f triton_python_backend_stub
sleep 3
kill "$pid" 2>/dev/null
wait "$pid"
exit 124

"""Diagnostics for GPU-machine runs (benchmarks/gpu_session.sh puts this folder first on
PYTHONPATH): every Python process, the Triton python-backend stubs included, writes the stacks
of all its threads to /tmp/helios-stacks/<pid>.txt on SIGUSR2, so that a stalled request
shows where it waits."""

import faulthandler
import os
import signal

os.makedirs("/tmp/helios-stacks", exist_ok=True)
_file = open(f"/tmp/helios-stacks/{os.getpid()}.txt", "w")  # noqa: SIM115  (kept open)
_file.write(f"{os.getpid()} {os.environ.get('_', '')}\n")
_file.flush()
faulthandler.register(signal.SIGUSR2, file=_file, all_threads=True)

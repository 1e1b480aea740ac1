"""Diagnostics for GPU-machine runs (benchmarks/gpu_session.sh puts this folder first on
PYTHONPATH): every Python process, the Triton python-backend stubs included, prints the stacks
of all its threads to stderr on SIGUSR2, so that a stalled request shows where it waits."""

import faulthandler
import signal
import sys

faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)

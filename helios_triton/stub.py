"""What every Triton model's stub process shares, torch or not: the environment's settings,
crash reports, the model's parameters, and the client-facing requests read and checked.

Nothing here imports torch, so that the front models, which only check requests and pass them
on (``tokenizer``, ``helios_update``, ``helios_video``), start without it: each stub process
imports its model alone, and torch costs about 3 s of CPU there (a server's start on a 2-core
machine). Only ``input_array`` imports ``triton_python_backend_utils``, when it is called
(only the stub has it), so the rest is tested in an ordinary process.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import locale
import logging
import os
import signal
import sys
from typing import Callable

import numpy as np

from helios.errors import HeliosError
from helios.schedule import validate_request
from helios.settings import Settings, from_environment

log = logging.getLogger("helios_triton")


def input_array(request, name):
    """A request's input as a numpy array, or None where the request lacks it."""
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415

    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def enable_stack_dumps(folder: str) -> None:
    """On SIGUSR2, write the Python stack of every thread of this process to
    ``folder/<pid>.txt``: what a stalled stage model is waiting on. ``process_settings`` arms
    it in every stub process when ``HELIOS_STACKS_DIR`` is set (``helios.settings``), so
    ``pkill -USR2 -f triton_python_backend_stub`` shows where each stage is, with nothing to
    install and no ptrace rights (py-spy needs both). A crash (SIGSEGV, SIGABRT, ...) writes
    there too."""
    os.makedirs(folder, exist_ok=True)
    out = open(os.path.join(folder, f"{os.getpid()}.txt"), "w")  # noqa: SIM115  kept open
    out.write(f"pid {os.getpid()}\n")
    out.flush()
    faulthandler.register(signal.SIGUSR2, file=out, all_threads=True)
    faulthandler.enable(file=out, all_threads=True)


def utf8_files() -> str:
    """Make text files this process opens UTF-8 by default; returns the encoding now in use.

    tritonserver's python-backend stub runs an isolated interpreter (``sys.flags.isolated``:
    PYTHONPATH, PYTHONUTF8 and the other PYTHON* variables are ignored) in the C locale, so
    ``open()`` defaults to ASCII there. Inductor reads its kernel templates that way, and
    with torch 2.13 one of them is not ASCII: torch.compile failed inside a stub with a
    UnicodeDecodeError (seen on a CPU, 2026-12-02). A UTF-8 character type fixes the
    default; where the C.UTF-8 locale is missing, it stays as it was."""
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error:
            log.warning("the C.UTF-8 locale is missing: text files open as %s",
                        locale.getpreferredencoding(False))
    return locale.getpreferredencoding(False)


STUB_EXECUTABLE = "triton_python_backend_stub"


def in_stub() -> bool:
    """Whether this process is a python-backend stub (its executable, not a Python)."""
    try:
        return os.path.basename(os.readlink("/proc/self/exe")) == STUB_EXECUTABLE
    except OSError:
        return False


def _exit_now() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def skip_teardown() -> None:
    """End this stub process, once it has unloaded, without the interpreter's teardown.

    Triton unloads a model's instances one after another, and each waits for its stub
    process to exit. The stub answers the unload, runs the model's ``finalize`` and releases
    its shared memory before its interpreter shuts down; what is left is Python tearing down
    every module, torch's among them, which took about 1 s a stub on a 2-core machine: a
    server filled for 8 streams (8 ``helios`` instances) took 17.5 s to unload that model,
    against 9.5 s with this (2026-12-04). So the first exit handler to run (registered last,
    here) flushes the logs and ends the process at once. Only in a stub: an ordinary process
    (a test calling this) keeps its exit code."""
    if in_stub():
        atexit.register(_exit_now)


def process_settings() -> Settings:
    """The environment's switches (``helios.settings``), applied to this stub process: stack
    dumps armed where asked for, text files UTF-8 (``utf8_files``); the models that run
    attention apply its switches when they load (``helios_triton.stage``). A crash of the
    process (SIGSEGV, SIGABRT, ...) prints every thread's stack to the server's log, or to the
    stacks folder where one is set; its end skips the interpreter's teardown
    (``skip_teardown``). Every model's ``initialize`` calls it (through ``load_stage`` or
    directly)."""
    skip_teardown()
    utf8_files()
    settings = from_environment()
    if settings.stacks_dir is not None:
        enable_stack_dumps(str(settings.stacks_dir))
    else:
        faulthandler.enable(all_threads=True)
    return settings


def prompt_text(raw) -> str:
    """A BYTES ``PROMPT`` element as text; HeliosError naming PROMPT if it is not UTF-8."""
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise HeliosError("PROMPT", "must be valid UTF-8 text") from None


def video_request(config, array: Callable, speculative: bool):
    """The client-facing inputs (``helios``, ``helios_video``) as a checked VideoRequest:
    ``array(name)`` gives an input as a numpy array, or None where the request lacks it.
    Raises HeliosError naming the first bad input (the table of docs/serving.md)."""
    def scalar(name):
        a = array(name)
        return None if a is None else a.reshape(-1)[0].item()

    prompt = array("PROMPT")
    if prompt is None:
        raise HeliosError("PROMPT", "is required")
    num_frames, duration = scalar("NUM_FRAMES"), scalar("DURATION_S")
    if num_frames is None and duration is None:
        raise HeliosError("NUM_FRAMES", "or DURATION_S must be given")
    kwargs = {"num_frames": num_frames, "duration_s": duration, "fps": scalar("FPS"),
              "image": array("IMAGE"), "video": array("VIDEO"), "pace_s": scalar("PACE_S")}
    for key, name in (("seed", "SEED"), ("temperature", "TEMPERATURE"), ("top_k", "TOP_K"),
                      ("top_p", "TOP_P")):
        value = scalar(name)
        if value is not None:
            kwargs[key] = value
    return validate_request(config, prompt_text(prompt.reshape(-1)[0]), speculative=speculative,
                            **kwargs)


def requested_outputs(wanted, arrays: dict) -> dict:
    """The entries of {output name: array} named in ``wanted`` (a request's
    ``requested_output_names()``; empty means all), each a fresh C-order
    array that owns its memory. A response must not carry outputs its BLS caller did not
    request: tritonserver 2.51's python-backend stub under Python 3.12 then crashes (SIGSEGV in
    libpython, seen on the GPU machine when ar_backbone answered the helios model's BLS stream
    with output_ids and sequence_length; a two-model decoupled repository reproduced it)."""
    wanted = set(wanted) or set(arrays)
    return {k: np.array(v, order="C", copy=True) for k, v in arrays.items() if k in wanted}


def response_parts(chunk, first: bool):
    """(frames, offset, final) of each response a chunk leaves in. A stream's first chunk
    leaves as its first frame alone, then the rest: at 1280x720 a chunk of 4 frames is 11 MB,
    and between the stub's ``send`` and a gRPC streaming client such a response took 29-41 ms
    on a 2-core CPU against 6.7-6.9 ms for one frame, and on an H200 the 14b stream's first
    frame reached the client after 176 ms against 216 (docs/performance.md). Every later
    chunk is one response."""
    if first and len(chunk.frames) > 1:
        yield chunk.frames[:1], chunk.offset, False
        yield chunk.frames[1:], chunk.offset + 1, chunk.final
    else:
        yield chunk.frames, chunk.offset, chunk.final


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters`` of a model's config.pbtxt as a plain {key: string} dict."""
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}

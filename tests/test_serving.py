"""The AR scheduler behind the Triton ar_backbone model, without a server."""

import os
import threading

import numpy as np
import pytest
import torch

from helios.ar_backbone import ARBackbone
from helios.ar_runtime import ARRuntime
from helios.config import ARConfig
from helios.errors import HeliosError
from helios.sampling import SamplingParams
from helios.schedule import plan_vocab_bias
from helios.ar_scheduler import ARJob, ARScheduler
from helios_triton.stage import compile_batches
from helios_triton.stub import requested_outputs

CFG = ARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, plan_vocab_size=32, max_position_embeddings=256)


def _model():
    m = ARBackbone(CFG)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


class _Collector:
    def __init__(self):
        self.tokens, self.error, self.done = [], None, threading.Event()
        self.chunks = 0

    def emit(self, toks):
        self.tokens += toks
        self.chunks += 1

    def finish(self, error):
        self.error = error
        self.done.set()


def _job(rid, seed, n, col, prefix_len=4):
    prefix = torch.randn(prefix_len, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))
    return ARJob(rid, prefix, None, [CFG.bos_token_id], n, SamplingParams(seed=seed), plan_vocab_bias(CFG),
                 False, col.emit, col.finish)


def test_scheduler_batches_jobs_and_each_equals_a_solo_run():
    model = _model()
    solo = []
    for seed in (1, 2, 3):
        rt = ARRuntime(model, num_blocks=64, block_size=4)
        job = _job("x", seed, 10, _Collector())
        rt.add_sequence(0, job.prefix, job.tokens, job.params, None, job.bias)
        solo.append(rt.generate([0], 10)[0])
    sched = ARScheduler(ARRuntime(model, num_blocks=64, block_size=4))
    cols = [_Collector() for _ in range(3)]
    for i, col in enumerate(cols):
        sched.submit(_job(f"r{i}", i + 1, 10, col))
    for col in cols:
        assert col.done.wait(30)
    assert [c.tokens for c in cols] == solo
    assert all(c.error is None and c.chunks == 10 for c in cols)
    # Three jobs of 10 tokens in far fewer than 30 iterations: they shared their steps.
    assert sched.iterations < 20
    assert sched.stats()["kv_blocks_free"] == 64
    sched.close()


def test_stop_frees_blocks_and_full_pool_waits():
    model = _model()
    sched = ARScheduler(ARRuntime(model, num_blocks=8, block_size=4))
    long_col, started, release = _Collector(), threading.Event(), threading.Event()
    first_emit = long_col.emit

    def slow_emit(toks):  # hold the scheduler inside the first step until stop() was called
        first_emit(toks)
        started.set()
        release.wait(10)

    long_col.emit = slow_emit
    sched.submit(_job("long", 1, 20, long_col))            # needs ceil(25/4) = 7 blocks
    waiting = _Collector()
    sched.submit(_job("next", 2, 4, waiting))              # needs 3: waits for "long"
    assert started.wait(10)
    sched.stop("long")
    release.set()
    assert long_col.done.wait(30) and long_col.error is None
    assert len(long_col.tokens) == 1
    assert not waiting.done.is_set() or len(waiting.tokens) == 4
    assert waiting.done.wait(30) and len(waiting.tokens) == 4
    too_big = _Collector()
    sched.submit(_job("big", 3, 40, too_big))
    assert too_big.done.wait(5)
    assert too_big.error == ("request needs 12 KV cache blocks of 4 tokens, the pool has 8 "
                             "(max_tokens_in_paged_kv_cache)")
    assert sched.stats()["kv_blocks_free"] == 8
    sched.close()


def test_server_refuses_numpy_2(monkeypatch):
    """With numpy 2 the python backend corrupts BYTES inputs and crashes on the first request:
    the launcher stops before that, saying why."""
    import numpy
    import pytest

    from helios_triton.server import check_numpy

    check_numpy()  # the pinned numpy 1.26 passes
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(SystemExit, match=r"^numpy 2\.4\.6 is installed; the python backend of "
                                         r"tritonserver 2\.51 corrupts BYTES tensors with numpy 2"):
        check_numpy()


def test_requested_outputs_keeps_what_was_asked_as_owning_arrays():
    """Stage models answer a BLS caller with its requested outputs only (an unrequested one
    crashes tritonserver 2.51's stub under Python 3.12, docs/serving.md)."""
    base = np.arange(6, dtype=np.int32)
    arrays = {"output_ids": base.reshape(1, 1, -1)[..., 1:], "sequence_length": np.array([[5]], np.int32)}
    out = requested_outputs(["output_ids"], arrays)
    assert list(out) == ["output_ids"]
    assert out["output_ids"].base is None and out["output_ids"].flags.c_contiguous
    assert out["output_ids"].tolist() == [[[1, 2, 3, 4, 5]]]
    assert list(requested_outputs([], arrays)) == ["output_ids", "sequence_length"]  # none named: all


def test_torch_compile_parameter():
    assert compile_batches("off") is False and compile_batches("on") is True
    assert compile_batches(" 1,3 ") == {1, 3}
    for bad in ("0", "yes", "1,,2"):
        with pytest.raises(HeliosError) as e:
            compile_batches(bad)
        assert str(e.value) == f"torch_compile must be off, on or batch sizes >= 1 such as 1,2, got {bad!r}"


def test_mps_start_quits_a_daemon_left_by_a_previous_run(tmp_path, monkeypatch, capsys):
    """--mps: when `nvidia-cuda-mps-control -d` refuses because a previous run's daemon is
    still up, start() quits that daemon and starts its own (a stand-in control program that
    behaves like the driver's: one daemon per pipe folder, "quit" on stdin ends it)."""
    from helios_triton.server import MPS

    calls, up = tmp_path / "calls.txt", tmp_path / "daemon_up"
    control = tmp_path / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir()
    control.write_text(f"""#!/bin/sh
if [ "$1" = -d ]; then
    echo "-d $CUDA_MPS_PIPE_DIRECTORY" >> {calls}
    [ -e {up} ] && {{ echo "An instance of this daemon is already running"; exit 1; }}
    touch {up}
else
    read cmd; echo "$cmd" >> {calls}; [ "$cmd" = quit ] && rm -f {up}
fi
""")
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{control.parent}:{os.environ['PATH']}")
    up.touch()  # the previous run's daemon
    mps = MPS(tmp_path / "mps").start()
    pipe = tmp_path / "mps" / "pipe"
    assert calls.read_text().splitlines() == [f"-d {pipe}", "quit", f"-d {pipe}"]
    assert up.exists() and "previous run still running: quitting it" in capsys.readouterr().err
    mps.stop()
    assert not up.exists()


def test_a_stub_process_opens_text_files_as_utf8(tmp_path):
    """tritonserver's stub runs an isolated interpreter in the C locale, where open() would
    default to ASCII (Inductor's templates then fail to load); process_settings makes the
    default UTF-8 again. Here the C locale is set first, as the stub has it."""
    import locale
    import sys

    from helios_triton.stub import utf8_files

    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode is on: open() is UTF-8 whatever the locale")
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        assert locale.getpreferredencoding(False) == "ANSI_X3.4-1968"
        text = tmp_path / "template.txt"
        text.write_bytes("a kernel template \u2019s quote".encode())
        with pytest.raises(UnicodeDecodeError):
            text.read_text()
        assert utf8_files() == "UTF-8"
        assert text.read_text() == "a kernel template \u2019s quote"
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)

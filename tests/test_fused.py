"""``fill_repository --stages fused``: every stage inside the helios model's process. The same
schedule as the stage models and the in-process pipeline, so the same frames for the same
seed, prompt switches, HTTP clients and concurrent streams included."""

import math
import threading

import numpy as np
import pytest

from helios.pipeline import HeliosPipeline

from conftest import INSTANCES, free_ports, steer
from helios_client import HeliosClient
from helios_client.api import new_session_id
from helios_triton.fill_repository import CLIENT_MODELS, fill, main as fill_main, values
from helios_triton.server import TritonServer

RED = "a red circle moving left on a dark background"
BLUE = "a blue square moving right on a dark background"


@pytest.fixture(scope="module")
def fused(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    fill(tmp / "repo", values(tiny_checkpoint, "cpu", 4, True, INSTANCES, 0.5, stages="fused"),
         fused=True)  # four streams at once
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(tmp / "repo", http, grpc, metrics, log_file=tmp / "server.log",
                       backends=tmp / "backends")
    srv.start(timeout=240)
    yield srv
    srv.stop()


def _video(chunks):
    return np.concatenate([c.frames for c in chunks])


def test_a_fused_repository_holds_the_client_models_alone(tiny_checkpoint, tmp_path):
    fill(tmp_path / "repo", values(tiny_checkpoint, "cpu", 4, True, INSTANCES, 0.5,
                                   stages="fused"), fused=True)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(CLIENT_MODELS)
    config = (tmp_path / "repo" / "helios" / "config.pbtxt").read_text()
    assert 'key: "stages" value: { string_value: "fused" }' in config
    assert "count: 1 kind: KIND_CPU" in config  # each instance would hold every stage


def test_fused_is_refused_for_the_tensorrt_flavour(tiny_checkpoint, tmp_path, capsys):
    assert fill_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "r"),
                      "--flavour", "tensorrt", "--stages", "fused"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fill_repository: error: stages fused runs the torch stages; the tensorrt flavour's "
        "stages are engines behind their own models")


def test_a_fused_server_streams_the_frames_of_the_pipeline(fused, pipe):
    session_id = new_session_id()
    client = HeliosClient(f"127.0.0.1:{fused.grpc}")
    t = steer(fused, session_id, BLUE, 32)
    got = _video(client.stream(RED, num_frames=64, seed=7, session_id=session_id))
    t.join(10)
    want = _video(pipe.generate(RED, num_frames=64, seed=7, prompt_at=[(32 / 24, BLUE)]))
    assert np.array_equal(got, want)
    # helios_video (HTTP) runs through the fused helios model as well.
    http = HeliosClient(f"127.0.0.1:{fused.http}", "http")
    assert np.array_equal(http.generate(RED, num_frames=24, seed=3),
                          pipe.generate_video(RED, num_frames=24, seed=3))


def test_with_the_plans_prefetched_the_frames_stay_the_same(tiny_checkpoint, tmp_path, pipe):
    """``--prefetch-plans``: the AR decodes ahead in a thread of the helios process; the plan
    tokens, so the frames, are those decoded one after the other. With ``--overlap-decode on``
    as well (the default with ``--device cuda``), which the helios process's log names."""
    fill(tmp_path / "repo", values(tiny_checkpoint, "cpu", 1, True, INSTANCES, 0.5,
                                   stages="fused", prefetch_plans=True, overlap_decode="on"),
         fused=True)
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(tmp_path / "repo", http, grpc, metrics, log_file=tmp_path / "server.log",
                       backends=tmp_path / "backends")
    srv.start(timeout=240)
    try:
        got = _video(HeliosClient(f"127.0.0.1:{grpc}").stream(RED, num_frames=48, seed=11))
    finally:
        srv.stop()
    assert "decodes overlapped with the next render" in (tmp_path / "server.log").read_text()
    assert np.array_equal(got, pipe.generate_video(RED, num_frames=48, seed=11))


def test_prefetch_needs_the_fused_stages(tiny_checkpoint, tmp_path, capsys):
    assert fill_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "r"),
                      "--prefetch-plans"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fill_repository: error: prefetch-plans needs --stages fused: with the stage models "
        "the AR runs ahead in its own process already")


def test_prefetch_needs_one_stream(tiny_checkpoint, tmp_path, capsys):
    assert fill_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "r"),
                      "--stages", "fused", "--prefetch-plans"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fill_repository: error: prefetch-plans needs --max-streams 1, got 8: with several "
        "fused streams the shared AR scheduler decodes ahead already")


JOBS = [("a green triangle bouncing", 1), ("a yellow circle growing", 2), (RED, 3)]


def _concurrently(run) -> dict:
    """``run(prompt, seed)`` for every job at once, each in a thread: {seed: result}."""
    results, errors = {}, []

    def one(prompt, seed):
        try:
            results[seed] = run(prompt, seed)
        except Exception as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=one, args=job) for job in JOBS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, [str(e) for e in errors]
    return results


def test_a_shared_pipeline_batches_concurrent_streams_without_changing_them(tiny_checkpoint, pipe):
    """``shared_ar``: streams in threads of their own share batched AR rounds and take turns
    rendering; each gets the frames it gets alone, and every KV block comes back, a stream
    closed half-way included."""
    shared = HeliosPipeline.from_checkpoint(tiny_checkpoint, max_streams=3, shared_ar=True)
    try:
        results = _concurrently(lambda prompt, seed: shared.generate_video(
            prompt, num_frames=40, seed=seed))
        for prompt, seed in JOBS:
            assert np.array_equal(results[seed], pipe.generate_video(prompt, num_frames=40,
                                                                     seed=seed))
        tokens = 3 * math.ceil(40 / 4) * shared.config.plan_tokens_per_frame
        assert shared.scheduler.iterations < tokens  # the rounds were shared
        # A start's first frame renders with the GPU to itself: its AR request holds after the
        # frame's plan tokens until the next frame is asked for.
        session = shared.session(RED, num_frames=96, seed=5)
        chunks = iter(session)
        next(chunks)
        rounds = shared.scheduler.iterations
        deadline = threading.Event()
        deadline.wait(0.5)
        assert shared.scheduler.iterations == rounds
        next(chunks)
        assert shared.scheduler.iterations > rounds
        session.close()
        for _ in range(100):  # the scheduler drops a closed stream at its next round
            if shared.scheduler.stats()["kv_blocks_used"] == 0:
                break
            deadline.wait(0.05)
        assert shared.scheduler.stats() | {"iterations": 0} == {
            "kv_blocks_total": shared.ar.cache.num_blocks,
            "kv_blocks_free": shared.ar.cache.num_blocks, "kv_blocks_used": 0,
            "active_sequences": 0, "queued_requests": 0, "iterations": 0,
            "draft_tokens": shared.ar.stats["draft_tokens"],
            "accepted_draft_tokens": shared.ar.stats["accepted_tokens"]}
    finally:
        shared.close()


def test_the_stream_threads_warm_up_decoding_as_the_requests_will(tiny_checkpoint):
    """The fused server's threads are warmed with its own decoding: with speculative decoding
    off (as gpu.sh fills the server) the warm-up drafts nothing, so the plain batched rounds
    the requests will run are the ones compiled and captured; with it on, it drafts."""
    from helios_triton.stage import stream_threads

    for speculative in (False, True):
        shared = HeliosPipeline.from_checkpoint(tiny_checkpoint, max_streams=2, shared_ar=True)
        try:
            lines = []
            with stream_threads(shared, lines.append, speculative):
                pass
            assert (shared.ar.stats["draft_tokens"] > 0) is speculative
            assert lines[-1].startswith("helios: 2 stream threads warmed up in ")
        finally:
            shared.close()


def test_a_fused_server_streams_concurrent_streams_each_as_alone(fused, pipe):
    results = _concurrently(lambda prompt, seed: HeliosClient(f"127.0.0.1:{fused.grpc}").generate(
        prompt, num_frames=40, seed=seed))
    for prompt, seed in JOBS:
        assert np.array_equal(results[seed], pipe.generate_video(prompt, num_frames=40, seed=seed))

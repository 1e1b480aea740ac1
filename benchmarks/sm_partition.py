"""Whether the AR's decode steps and the refiner's render can run at once on one GPU when its
SMs are split between them (CUDA green contexts).

    python benchmarks/sm_partition.py --config 14b --ar-sms 16,32,48 --out results/

A decode step reads every AR weight once (bound by memory bandwidth); a render multiplies
large matrices (bound by the tensor cores). Side by side on two CUDA streams, as the pipeline
runs them with ``--prefetch-plans``, each kernel still spreads over every SM it can get, so
they mostly take turns: the render and a latent frame's decode steps together cost about
their sum. With the SMs split, the steps keep a few SMs (enough to stream the weights at near
the copy rate, if they are) and the render the rest.

Both stages are built as profile_stages.py builds them (compiled, captured as CUDA graphs). For
each split, and for the two plain streams of the pipeline's prefetch, it measures a latent frame's
work (one render and ``plan_tokens_per_frame`` decode steps): each alone on its SMs, and both
launched at once (wall time a frame, over several frames), beside what a plain copy and a
matrix product get on each side. A CUDA graph keeps the SMs of the stream it was captured on,
not of the one it is replayed on (measured: ``graph_probe``), so each split is measured twice:
with the stages' graphs as the pipeline captured them, and captured again on their sides'
streams. The partitions come from the CUDA driver (cuDevSmResourceSplitByCount,
cuGreenCtxCreate, cuGreenCtxStreamCreate, through ctypes), so any PyTorch with CUDA 12.4 or
later can run it. docs/performance.md ("Splitting the SMs") has the results.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend
from fps import ceilings, floors_ms, gpu_ms, write_result  # benchmarks/fps.py
from profile_stages import ar_runtime, build_render  # built as the pipeline builds them

from helios import attention
from helios.checkpoint import random_components
from helios.config import get_config

_RESOURCE_BYTES = 1024  # room for one CUdevResource (152 bytes in CUDA 13)
_SM_COUNT_OFFSET = 96   # CUdevResource: type (4 bytes), padding (92), then the SM resource


class SmSplit:
    """The device's SMs in two disjoint green contexts: ``sms[0]`` of them (rounded up by the
    driver to its partition granularity) and the rest, a non-blocking stream on each."""

    def __init__(self, device: torch.device, first: int):
        cu = self.cu = ctypes.CDLL("libcuda.so.1")
        cu.cuDevResourceGenerateDesc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                 ctypes.c_uint]
        cu.cuGreenCtxCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_uint]
        cu.cuGreenCtxStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                              ctypes.c_uint, ctypes.c_int]
        cu.cuCtxFromGreenCtx.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        cu.cuCtxPushCurrent.argtypes = [ctypes.c_void_p]
        self.contexts = []  # each side's green context, as a CUcontext
        torch.cuda.init()  # the primary context first: the green contexts retain it
        dev = ctypes.c_int()
        self._check(cu.cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
        whole, group, rest = (ctypes.create_string_buffer(_RESOURCE_BYTES) for _ in range(3))
        self._check(cu.cuDeviceGetDevResource(dev, whole, 1), "cuDeviceGetDevResource")  # SM
        count = ctypes.c_uint(1)
        self._check(cu.cuDevSmResourceSplitByCount(group, ctypes.byref(count), whole, rest, 0,
                                                   first), "cuDevSmResourceSplitByCount")
        self.sms = tuple(ctypes.c_uint.from_buffer(r, _SM_COUNT_OFFSET).value
                         for r in (group, rest))
        self.streams = [self._stream(dev, r, device) for r in (group, rest)]

    def _check(self, rc: int, what: str) -> None:
        if rc:
            name = ctypes.c_char_p()
            self.cu.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{what}: {name.value.decode() if name.value else rc}")

    def _stream(self, dev, resource, device) -> torch.cuda.ExternalStream:
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.cu.cuDevResourceGenerateDesc(ctypes.byref(desc),
                                                      ctypes.addressof(resource), 1),
                    "cuDevResourceGenerateDesc")
        self._check(self.cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, 1), "cuGreenCtxCreate")
        as_ctx = ctypes.c_void_p()
        self._check(self.cu.cuCtxFromGreenCtx(ctypes.byref(as_ctx), ctx), "cuCtxFromGreenCtx")
        self.contexts.append(as_ctx)
        self._check(self.cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, 1, 0),
                    "cuGreenCtxStreamCreate")  # CU_STREAM_NON_BLOCKING, default priority
        return torch.cuda.ExternalStream(stream.value, device=device)

    @contextlib.contextmanager
    def current(self, side: int):
        """Side ``side``'s green context current on this thread (cuCtxPushCurrent)."""
        self._check(self.cu.cuCtxPushCurrent(self.contexts[side]), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self._check(self.cu.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p())),
                        "cuCtxPopCurrent")


# How a CUDA graph can be captured for a side: (capture on the side's stream, with the side's
# green context current on the capturing thread).
CAPTURES = {"plain stream": (False, False), "green stream": (True, False),
            "plain stream, green context current": (False, True),
            "green stream, green context current": (True, True)}


@contextlib.contextmanager
def capturing(split: SmSplit, side: int, how: str):
    """Inside: the current stream and context that ``CAPTURES[how]`` names for ``side``, and
    every ``torch.cuda.graph`` capturing on that stream (the stages' captures name none, and
    torch's default is a side stream of its own)."""
    on_green, current = CAPTURES[how]
    stream = split.streams[side] if on_green else torch.cuda.Stream(split.streams[side].device)
    graph = torch.cuda.graph
    torch.cuda.graph = functools.partial(graph, stream=stream)
    try:
        with split.current(side) if current else contextlib.nullcontext():
            with torch.cuda.stream(stream):
                yield stream
    finally:
        torch.cuda.graph = graph


def graph_probe(split: SmSplit, device) -> dict:
    """A copy's bytes a second on the AR side's stream, replayed from a CUDA graph captured
    each way of ``CAPTURES``. Whichever reads like the side's plain copy keeps the partition."""
    x = torch.empty(2**28, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    out = {}
    for how in CAPTURES:
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(split, 0, how):
                with torch.cuda.graph(graph):
                    y.copy_(x)
            out[how] = 4 * x.numel() / alone_ms(split.streams[0], graph.replay, 10) * 1e3
        except RuntimeError as e:
            out[how] = str(e)
    return out


def recaptured(cfg, ar, refiner, device, split: SmSplit, how: str):
    """The decode step and the render captured again, each for its side the way ``how`` says:
    (the AR runtime, its step, the render)."""
    with capturing(split, 0, how):
        rt = ar_runtime(cfg, ar, device)
    refiner._render_graphs, refiner._graph_pool = {}, torch.cuda.graph_pool_handle()
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    with capturing(split, 1, how):
        refiner.warm_up(shape, torch.bfloat16, device)
    z = torch.randn(shape, device=device, dtype=torch.bfloat16)
    plan = torch.zeros(1, cfg.plan_tokens_per_frame, dtype=torch.long, device=device)
    return rt, rt.static_step(1).replay, functools.partial(
        refiner.render, z, plan, z, [z] * cfg.refiner.history_frames)


def on(stream, fn):
    def run():
        with torch.cuda.stream(stream):
            fn()
    return run


def alone_ms(stream, fn, reps: int) -> float:
    """Median GPU ms of fn() on ``stream`` (its CUDA events recorded there)."""
    with torch.cuda.stream(stream):
        return gpu_ms(fn, reps)


def together(render, steps, rf_stream, ar_stream, frames: int) -> float:
    """Wall ms a latent frame with the render and the steps launched at once on their
    streams, over ``frames`` frames (after one to settle)."""
    for n in (1, frames):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            on(rf_stream, render)()
            on(ar_stream, steps)()
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / frames * 1e3


def probes(stream, device) -> dict:
    """What plain kernels get on ``stream``: a copy's bytes a second (read plus written) and
    a bf16 matrix product's FLOPs a second. Set beside the stages' own times, they tell the
    partition's hold on ordinary launches from its hold on a CUDA graph's replays."""
    x = torch.empty(2**28, device=device, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    out = {"copy_bytes_per_s": 4 * x.numel() / alone_ms(stream, lambda: y.copy_(x), 10) * 1e3,
           "bf16_matmul_flop_per_s": 2 * 8192**3 / alone_ms(stream, lambda: a @ a, 10) * 1e3}
    return out


def sides(rf_stream, ar_stream, device) -> dict:
    """``probes`` of each side's stream."""
    return {"ar_side": probes(ar_stream, device), "render_side": probes(rf_stream, device)}


def measure(render, steps, rf_stream, ar_stream, frames: int, probed: dict) -> dict:
    """A latent frame's render and steps, each alone on its stream and both at once, beside
    the streams' ``sides`` (``probed``)."""
    out = {"render_ms": alone_ms(rf_stream, render, 10), "steps_ms": alone_ms(ar_stream, steps, 20),
           **probed}
    out["sum_ms"] = out["render_ms"] + out["steps_ms"]
    out["together_ms"] = together(render, steps, rf_stream, ar_stream, frames)
    out["overlap"] = 1 - out["together_ms"] / out["sum_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="14b")
    ap.add_argument("--ar-sms", default="16,32,48",
                    help="comma-separated SM counts to give the AR's steps (the render gets "
                         "the rest)")
    ap.add_argument("--frames", type=int, default=8, help="latent frames timed together")
    ap.add_argument("--without-cudnn", action="store_true",
                    help="cuDNN off: it refused a green context's stream while the render "
                         "was captured there")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.without_cudnn:
        torch.backends.cudnn.enabled = False
        attention._SDPA_ORDER.remove(SDPBackend.CUDNN_ATTENTION)  # named there explicitly
    device = torch.device("cuda")
    cfg = get_config(args.config)
    ceil = ceilings(device)
    parts = random_components(cfg, device, torch.bfloat16)
    ar = parts["ar_backbone"]
    n = cfg.plan_tokens_per_frame
    stage = floors_ms(cfg, ar, ceil)
    floors = {"steps_ms": n * stage["ar_round"], "render_ms": stage["refiner"]}
    result = {"config": cfg.name, "device": torch.cuda.get_device_name(device),
              "sms": torch.cuda.get_device_properties(device).multi_processor_count,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "ceilings": ceil,
              "floors_ms": floors, "plan_tokens_per_frame": n, "splits": []}
    with torch.no_grad():
        rt = ar_runtime(cfg, ar, device)  # held: its KV cache is what the captured step reads
        step = rt.static_step(1).replay
        render = build_render(cfg, parts["refiner"], device)

        def frame_steps(step):
            def steps():
                for _ in range(n):
                    step()
            return steps

        # The pipeline's prefetch: the render on the default stream, the steps on a
        # high-priority one.
        streams = (torch.cuda.current_stream(), torch.cuda.Stream(device, priority=-1))
        plain = measure(render, frame_steps(step), *streams, args.frames,
                        sides(*streams, device))
        result["plain_streams"] = plain
        rows = [("two plain streams (the steps' high priority)", plain)]
        for k in (int(s) for s in args.ar_sms.split(",")):
            try:
                split = SmSplit(device, k)
            except (OSError, RuntimeError) as e:
                result["splits"].append({"ar_sms_asked": k, "error": str(e)})
                print(f"{k} SMs for the AR: {e}")
                continue
            probe = graph_probe(split, device)
            probed = sides(split.streams[1], split.streams[0], device)
            ar_copy = probed["ar_side"]["copy_bytes_per_s"]
            # The first capture that keeps the partition (within 20 % of a plain copy there).
            keeps = [h for h, v in probe.items()
                     if h != "plain stream" and isinstance(v, float) and v < 1.2 * ar_copy]
            for how in ["plain stream"] + keeps[:1]:
                held = parts["refiner"]._render_graphs, parts["refiner"]._graph_pool
                try:
                    if how == "plain stream":
                        stages = (rt, step, render)
                    else:
                        stages = recaptured(cfg, ar, parts["refiner"], device, split, how)
                    r = measure(stages[2], frame_steps(stages[1]), split.streams[1],
                                split.streams[0], args.frames, probed)
                except RuntimeError as e:  # e.g. a capture refused on a green context
                    result["splits"].append({"ar_sms": split.sms[0], "capture": how,
                                             "error": str(e)})
                    print(f"{split.sms[0]} SMs for the AR, graphs captured on a {how}: {e}")
                    continue
                finally:  # the render's first graphs again, for the next split's plain row
                    parts["refiner"]._render_graphs, parts["refiner"]._graph_pool = held
                r.update(ar_sms=split.sms[0], render_sms=split.sms[1], ar_sms_asked=k,
                         capture=how, copy_graph=probe)
                result["splits"].append(r)
                rows.append((f"AR {split.sms[0]} SMs, render {split.sms[1]}; {how[:20]}", r))
    print(f"\n{cfg.name}, a latent frame: one render and {n} decode steps "
          f"(floors: render {floors['render_ms']:.2f} ms, steps {floors['steps_ms']:.2f} ms)")
    print(f"{'':<46} {'render':>8} {'steps':>8} {'sum':>8} {'together':>9} {'overlap':>8}"
          f"  {'AR copy':>8} {'AR mm':>7} {'rf copy':>8} {'rf mm':>7}")
    for name, r in rows:
        a, b = r["ar_side"], r["render_side"]
        print(f"{name:<46} {r['render_ms']:>8.2f} {r['steps_ms']:>8.2f} {r['sum_ms']:>8.2f} "
              f"{r['together_ms']:>9.2f} {r['overlap'] * 100:>7.1f}%"
              f"  {a['copy_bytes_per_s'] / 1e12:>8.2f} {a['bf16_matmul_flop_per_s'] / 1e12:>7.0f}"
              f" {b['copy_bytes_per_s'] / 1e12:>8.2f} {b['bf16_matmul_flop_per_s'] / 1e12:>7.0f}")
    print("(ms a latent frame; copies in TB/s read plus written, products in TFLOP/s, each on "
          "the side's stream alone)")
    for r in result["splits"]:
        if r.get("capture") != "plain stream":
            continue
        for how, v in r.get("copy_graph", {}).items():
            print(f"AR {r['ar_sms']} SMs, a copy's graph captured on a {how}: "
                  + (f"{v / 1e12:.2f} TB/s" if isinstance(v, float) else v))
    write_result(args.out, "sm_partition.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

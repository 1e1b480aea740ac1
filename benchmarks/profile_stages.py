"""Where the GPU time of an AR decode round, a refiner render and a VAE decode goes, kernel by
kernel.

    python benchmarks/profile_stages.py --config 14b --out results/

Both stages are built as the pipeline runs them on CUDA: the AR's decode step compiled and
replayed as a CUDA graph, the refiner's steps compiled and each render replayed as one graph.
For each it prints and writes (``profile_stages.json``):

- the median GPU time of one graph replay (CUDA events) against its floor (the AR's weight bytes
  over the measured copy bandwidth; the render's FLOPs at the measured bf16 matrix rate, and
  at the rate the card keeps up at its power limit, ``fps.sustained_rate``);
- torch.profiler's kernels of the same replays, summed by kind: matrix products, attention,
  Inductor's fused kernels (norms, RoPE, activations, modulation), copies, other; what the
  replay takes beyond the kernels' sum is the time between kernels; each kernel's launch
  shape (grid, block, registers, shared memory) beside its time;
- the AR round once more with its projections fused (``fuse_projections``: q/k/v in one
  matrix, gate/up in another), the same weights; each layout once more with its one-row
  products by ``helios::gemv`` (``helios.ar_backbone.use_gemv``);
- the VAE decoder's 4 frames (``--parts vae``) as the pipeline runs them (compiled, launched
  from Python), against its FLOP floor (torch's FLOP counter of the same call at the bf16
  matrix rate), beside three variants of the same weights: eager, compiled with weights and
  input channels-last, and the compiled call replayed as a CUDA graph; then the frames'
  conversion to uint8 and their copy to the host.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import copy
import functools
import statistics
import tempfile

import torch
from fps import (ceilings, floors_ms, gpu_ms, load_gemv_tiles,  # benchmarks/fps.py
                 sustained_floor_ms, write_result)

from helios.accel import CompiledOrEager, accelerate
from helios.ar_backbone import fuse_projections, use_gemv
from helios.ar_runtime import ARRuntime, tune_steps
from helios.attention import backend, use_kernel
from helios.checkpoint import random_components
from helios.config import get_config
from helios.sampling import SamplingParams
from helios.schedule import plan_vocab_bias
from helios.settings import from_environment
from helios.vae import to_uint8

KINDS = (("attention", ("attention", "fmha", "flash", "cudnn")),
         ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
         ("copy", ("memcpy", "memset", "copy", "cat")))


def kind_of(name: str) -> str:
    """A kernel's kind by its name. Inductor's kernels come first: their names list the
    operators they fused, which may include the attention operator they surround."""
    if name.startswith("triton_"):
        return "fused (Inductor)"
    low = name.lower()
    for kind, words in KINDS:
        if any(w in low for w in words):
            return kind
    return "other"


def kernels(fn, reps: int) -> dict:
    """The kernels fn() runs, by kind and by name: GPU ms per call."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.device_time / 1e3 / reps
            entry[1] += 1
    by_kind: dict[str, float] = {}
    for name, (ms, _) in by_name.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    every = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        shapes = launch_shapes(json.loads(Path(f"{tmp}/trace.json").read_text()))
    return {"by_kind_ms": by_kind, "kernels_ms": sum(by_kind.values()),
            "launches": sum(n for _, n in by_name.values()) / reps,
            "top": [{"name": n[:160], "kind": kind_of(n), "ms": ms, "calls": c / reps,
                     **shapes.get(n, {})} for n, (ms, c) in every]}


def launch_shapes(trace: dict) -> dict:
    """Each kernel's launch shape in a profiler's Chrome trace, by name: its grid and block
    (and registers, shared memory), as the first of its launches had them. Two compiles of
    one Inductor kernel that run at different speeds tell their tuned tiles apart here."""
    keys = {"grid": "grid", "block": "block", "registers per thread": "registers",
            "shared memory": "shared_memory"}
    out: dict[str, dict] = {}
    for evt in trace.get("traceEvents", []):
        if evt.get("cat") == "kernel" and evt.get("name") not in out:
            args = evt.get("args", {})
            out[evt["name"]] = {ours: args[theirs] for theirs, ours in keys.items()
                                if theirs in args}
    return out


def ar_runtime(cfg, ar, device) -> ARRuntime:
    """The AR runtime of one stream as the pipeline builds it on CUDA (its decode step
    compiled and captured), after four steps of a stream."""
    rt = ARRuntime(ar, None, num_blocks=cfg.kv_blocks_per_stream(), block_size=cfg.kv_block_size,
                   device=device, cuda_graphs=True, max_positions=cfg.max_ar_positions(),
                   compile_steps=True)
    prefix = torch.randn(64, ar.config.hidden_size, device=device, dtype=torch.bfloat16)
    rt.add_sequence(0, prefix, [ar.config.bos_token_id], SamplingParams(seed=0),
                    bias=plan_vocab_bias(ar.config))
    for _ in range(4):
        rt.step([0])
    return rt


def ar_round(cfg, ar, device, floor_ms: float) -> dict:
    """One captured, compiled decode step of one stream, as the pipeline builds it."""
    t0 = time.perf_counter()
    rt = ar_runtime(cfg, ar, device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    runner = rt.static_step(1)
    replay = runner.graph.replay
    out = {"build_s": build_s, "compiled": runner.compiled, "replay_ms": gpu_ms(replay),
           # the same step sampling with top-k and top-p (their sorts), on the same machine
           "replay_filtered_ms": gpu_ms(runner.graphs[True].replay),
           "step_ms": gpu_ms(lambda: rt.step([0]), reps=20), "floor_ms": floor_ms,
           "profile": kernels(replay, 10),
           # the same kernels launched one by one (in case a profiler sees no graph's kernels)
           "profile_launched": kernels(runner._run, 5)}
    out["floor_ratio"] = out["replay_ms"] / floor_ms
    # A latent frame's steps in one decode_round, as the pipeline takes them: back to back,
    # the host waiting once. The first call ends the current frame; each later one is whole.
    n = cfg.plan_tokens_per_frame
    rt.decode_round({0: n}, group=n)
    out["frame_step_ms"] = gpu_ms(lambda: rt.decode_round({0: n}, group=n), reps=10) / n
    rt.free(0)
    return out


def build_render(cfg, refiner, device):
    """The refiner compiled and its renders captured, as the pipeline builds them on CUDA: a
    render of one latent frame at the full history, as a call."""
    accelerate(device, refiner=refiner)
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    refiner.warm_up(shape, torch.bfloat16, device)
    z = torch.randn(shape, device=device, dtype=torch.bfloat16)
    plan = torch.zeros(1, cfg.plan_tokens_per_frame, dtype=torch.long, device=device)
    return functools.partial(refiner.render, z, plan, z, [z] * cfg.refiner.history_frames)


def refiner_render(cfg, refiner, device, floor_ms: float) -> dict:
    """A render at the full history, replayed as the pipeline's CUDA graph."""
    t0 = time.perf_counter()
    render = build_render(cfg, refiner, device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        sig = refiner.sigmas()
        sig_t = torch.tensor(sig, device=device)
        out = {"build_s": build_s, "replay_ms": gpu_ms(render, reps=20), "floor_ms": floor_ms,
               "profile": kernels(render, 5),
               "profile_launched": kernels(lambda: refiner._render(*render.args, sig, sig_t), 3)}
    out["floor_ratio"] = out["replay_ms"] / floor_ms
    return out


def vae_decode(cfg, vae, device, flop_rate: float) -> dict:
    """The decoder's call of one latent frame as the pipeline makes it, and its variants."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    shape = (1, cfg.vae.latent_channels, cfg.latent_height, cfg.latent_width)
    z = torch.randn(shape, device=device, dtype=torch.bfloat16)
    eager = copy.deepcopy(vae.decoder)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            eager(z, z)
        floor_ms = counter.get_total_flops() / flop_rate * 1e3
        accelerate(device, vae=vae)
        t0 = time.perf_counter()
        vae.decode(z, z)
        torch.cuda.synchronize()
        out = {"build_s": time.perf_counter() - t0, "flops": counter.get_total_flops(),
               "floor_ms": floor_ms, "replay_ms": gpu_ms(lambda: vae.decode(z, z)),
               "profile": kernels(lambda: vae.decode(z, z), 10)}
        out["floor_ratio"] = out["replay_ms"] / floor_ms
        out["eager_ms"] = gpu_ms(lambda: eager(z, z))
        out["profile_launched"] = kernels(lambda: eager(z, z), 5)
        last = eager.to(memory_format=torch.channels_last)
        last_fn = CompiledOrEager(last.forward, "VAE decoder, channels last")
        zl = z.contiguous(memory_format=torch.channels_last)
        last_fn(zl, zl)
        out["channels_last_ms"] = gpu_ms(lambda: last_fn(zl, zl))
        out["channels_last_compiled"] = last_fn.compiled
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            vae.decode(z, z)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pixels = vae.decode(z, z)
        out["graph_ms"] = gpu_ms(graph.replay)
        out["to_uint8_gpu_ms"] = gpu_ms(lambda: to_uint8(pixels, non_blocking=True))
        walls = []
        for _ in range(20):
            torch.cuda.synchronize()
            t = time.perf_counter()
            to_uint8(pixels)
            walls.append((time.perf_counter() - t) * 1e3)
        out["to_uint8_wall_ms"] = statistics.median(walls[3:])
    return out


def inductor_search() -> dict:
    """How widely Inductor's tuning searches each kernel's configuration in this process
    (its environment variables: TORCHINDUCTOR_COORDINATE_DESCENT_RADIUS,
    ..._CHECK_ALL_DIRECTIONS, TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE), and whether its matrix
    products are autotuned among cuBLAS and its Triton templates (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM,
    ..._BACKENDS, ENABLE_PERSISTENT_TMA_MATMUL)."""
    from torch._inductor import config  # noqa: PLC0415

    return {"coordinate_descent_search_radius": config.coordinate_descent_search_radius,
            "coordinate_descent_check_all_directions":
                config.coordinate_descent_check_all_directions,
            "max_autotune_pointwise": config.max_autotune_pointwise,
            "max_autotune_gemm": config.max_autotune_gemm,
            "max_autotune_gemm_backends": config.max_autotune_gemm_backends,
            "persistent_tma_matmul": config.triton.enable_persistent_tma_matmul}


def table(title: str, r: dict) -> None:
    p = r["profile"]
    print(f"\n{title}: {r['replay_ms']:.2f} ms a replay, floor {r['floor_ms']:.2f} ms "
          f"({r['floor_ratio']:.2f}x); {p['launches']:.0f} kernels, {p['kernels_ms']:.2f} ms of them")
    if "floor_sustained_ms" in r:
        print(f"  at the matrix rate kept up: floor {r['floor_sustained_ms']:.2f} ms "
              f"({r['floor_sustained_ratio']:.2f}x)")
    for kind, ms in sorted(p["by_kind_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<18} {ms:>8.2f} ms  {ms / r['replay_ms'] * 100:>5.1f} %")
    gap = r["replay_ms"] - p["kernels_ms"]
    print(f"  {'between kernels':<18} {gap:>8.2f} ms  {gap / r['replay_ms'] * 100:>5.1f} %")
    for k in p["top"][:6]:
        shape = (f" grid {k['grid']} block {k['block']} regs {k.get('registers')}"
                 if "grid" in k else "")
        print(f"    {k['ms']:>7.3f} ms  x{k['calls']:<4.0f} {k['name'][:90]}{shape}")
    if "frame_step_ms" in r:
        print(f"  the step with top-k/top-p sampling (sorts): {r['replay_filtered_ms']:.2f} ms")
        print(f"  a step of a frame's decode_round (sampled, the host waiting once a frame): "
              f"{r['frame_step_ms']:.2f} ms; one step alone, the host waiting for it: "
              f"{r['step_ms']:.2f} ms")
    if "graph_ms" in r:
        print(f"  eager {r['eager_ms']:.2f} ms; compiled channels-last {r['channels_last_ms']:.2f} "
              f"ms; compiled and replayed as a CUDA graph {r['graph_ms']:.2f} ms; frames to "
              f"uint8 {r['to_uint8_gpu_ms']:.2f} ms of GPU, with the copy to the host "
              f"{r['to_uint8_wall_ms']:.2f} ms of wall time")
    q = r["profile_launched"]
    print(f"  launched one by one: {q['kernels_ms']:.2f} ms of kernels, "
          + ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(q["by_kind_ms"].items(),
                                                                 key=lambda kv: -kv[1])))


# The refiner's variants: --parts name -> (attention kernels on, FlashAttention-4's inputs
# packed by helios/kernels/qkv_pack.py where it runs, the q/k/v product written into them,
# the residual adds and norms by helios/kernels/residual_norm.py, the modulation rows made
# once at the capture, the table's title).
REFINER_PARTS = {
    "refiner": (True, True, True, True, True, "the pipeline's kernels"),
    "refiner-unrowed": (True, True, False, True, True,
                        "the q/k/v product apart from FlashAttention-4's inputs, then the pack"),
    "refiner-unpacked": (True, False, False, True, True,
                         "FlashAttention-4's inputs by Inductor's passes"),
    "refiner-unnormed": (True, True, True, False, True,
                         "the residual adds and norms by Inductor's kernels"),
    "refiner-mods-replayed": (True, True, True, True, False,
                              "the modulation rows made in each replay"),
    "refiner-sdpa": (False, True, True, False, True, "SDPA attention, Inductor's kernels"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="14b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", default="ar,refiner,refiner-sdpa",
                    help="ar: the decode round, plain and with fused projections; refiner: a "
                         "render with the pipeline's attention (FlashAttention-4 where it is "
                         "installed, its inputs packed by one kernel; else the Triton-lang "
                         "kernel); refiner-unrowed: the q/k/v product made apart and then "
                         "packed; refiner-unpacked: FlashAttention-4's inputs made by "
                         "Inductor's passes instead; refiner-unnormed: the blocks' residual "
                         "adds and norms by Inductor's kernels instead of one; "
                         "refiner-mods-replayed: the modulation rows made in each replay of "
                         "the render's graph instead of once at its capture; refiner-sdpa: "
                         "SDPA over the concatenated keys (cuDNN first), Inductor's kernels; "
                         "vae: the decoder of one latent frame; the refiner's variants run in "
                         "the order given, repeats included")
    ap.add_argument("--gemv-tiles", type=Path, default=None,
                    help="benchmarks/gemv.py's JSON: its best tile per weight shape for "
                         "helios::gemv, instead of helios.kernels.gemv.TILES")
    args = ap.parse_args(argv)
    parts_wanted = args.parts.split(",")
    tune_steps(from_environment().ar_step_tuning)  # TORCHINDUCTOR_COORDINATE_DESCENT_TUNING
    if args.gemv_tiles:
        load_gemv_tiles(args.gemv_tiles)
    device = torch.device("cuda")
    cfg = get_config(args.config)
    ceil = ceilings(device)
    parts = random_components(cfg, device, torch.bfloat16)
    ar = parts["ar_backbone"]
    floors = floors_ms(cfg, ar, ceil)
    ar_floor, rf_floor = floors["ar_round"], floors["refiner"]
    result = {"config": cfg.name, "device": torch.cuda.get_device_name(device),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "ceilings": ceil,
              "inductor_search": inductor_search(), "gemv_tiles": str(args.gemv_tiles or "")}
    if "ar" in parts_wanted:
        with torch.no_grad():
            for fused in (False, True):
                if fused:
                    fuse_projections(ar)
                for gemv in (False, True):
                    use_gemv(gemv)
                    # Compiled afresh, as the pipeline's own process compiles it: the one of
                    # 2026-12-03 compiled after the unfused step here ran 1.2 ms slower than
                    # the pipeline's.
                    torch._dynamo.reset()
                    key = "ar_round" + ("_fused" if fused else "") + ("_gemv" if gemv else "")
                    result[key] = ar_round(cfg, ar, device, ar_floor)
                    table("AR decode round" + (", projections fused" if fused else "")
                          + (", one-row products by helios::gemv" if gemv else ""), result[key])
    del parts["ar_backbone"], ar
    torch.cuda.empty_cache()
    for part in parts_wanted:  # in the order given, so that variants can alternate
        if part not in REFINER_PARTS:
            continue
        kernel, pack, rows, norms, mods_once, title = REFINER_PARTS[part]
        use_kernel(kernel, pack=pack, norms=norms, rows=rows)
        parts["refiner"].render_mods_once = mods_once
        torch._dynamo.reset()
        key = "refiner_render" + part.removeprefix("refiner").replace("-", "_")
        while key in result:
            key += "_again"
        r = result[key] = refiner_render(cfg, parts["refiner"], device, rf_floor)
        r["attention"] = backend()
        r["floor_sustained_ms"] = sustained_floor_ms(rf_floor, ceil)
        r["floor_sustained_ratio"] = r["replay_ms"] / r["floor_sustained_ms"]
        table(f"refiner render (full history), {title}", result[key])
    use_kernel(True)
    if "vae" in parts_wanted:
        result["vae_decode"] = vae_decode(cfg, parts["vae"], device,
                                          ceil["bf16_matmul_flop_per_s"])
        table("VAE decoder, 4 frames (compiled, launched from Python)", result["vae_decode"])
    write_result(args.out, "profile_stages.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""In-process FPS benchmark of the Helios pipeline on any config and device.

    python benchmarks/fps.py --config 14b --device cuda --seconds 2 --out results/
    python benchmarks/fps.py --config tiny --device cpu --seconds 2

Random weights of the real shapes are created on the device (no checkpoint file I/O). One
short warm-up video runs first; then every stage call of the measured video is timed
(synchronised wall clock), and the script prints per-stage medians, generated frames per second,
the first-frame latency, peak GPU memory, and each stage's ratio to its physical floor:
weight bytes / memory bandwidth for an AR decode step, FLOPs / matrix rate for the refiner.
Both ceilings are measured on the device first (a large device-to-device copy, counting bytes
read plus written; an 8192^3 bf16 matrix product on random data, alone and kept up for
seconds: ``sustained_rate``). JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from helios import ar_runtime, attention
from helios.checkpoint import random_components
from helios.ar_runtime import ARRuntime
from helios.config import get_config, with_plan_tokens
from helios.fp8 import quantize_ar, quantize_refiner
from helios.pipeline import HeliosPipeline
from helios.refiner import modulation_level, render_flops
from helios.sampling import SamplingParams
from helios.schedule import validate_request
from helios.settings import from_environment


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(device, fn, reps: int = 12) -> float:
    """Median wall time of ``fn`` (synchronised), the first 2 of ``reps`` runs left out."""
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def gpu_ms(fn, reps: int = 30) -> float:
    """Median GPU time of fn() in ms by CUDA events, the first 3 calls left out."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def ceilings(device) -> dict:
    """Measured copy bandwidth (bytes read + written per second), bf16 matmul rate, and the
    e4m3 matmul rate of ``_scaled_mm`` with row-wise scales (the refiner's FP8 path)."""
    if device.type != "cuda":
        return {}
    x = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / _median_s(device, lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    rate = 2 * 8192**3 / _median_s(device, lambda: a @ b)
    sustained = sustained_rate(a, b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa = torch.ones(8192, 1, device=device)
    sb = torch.ones(1, 8192, device=device)
    rate8 = 2 * 8192**3 / _median_s(device, lambda: torch._scaled_mm(
        a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True))
    del x, y, a, b, a8, b8
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_matmul_flop_per_s": rate,
            "bf16_matmul_sustained_flop_per_s": sustained, "fp8_matmul_flop_per_s": rate8}


def sustained_rate(a: torch.Tensor, b: torch.Tensor, seconds: float = 8.0) -> float:
    """The bf16 matrix rate of ``a @ b`` (square) kept up for ``seconds``: products back to
    back in CUDA-graph replays of 20, the median of the second half of the replays. A card at
    its power limit lowers its clock after the first ones: on an H200 (700 W) 8192^3 products
    fell from 784 TFLOP/s, each product alone, to 672 after a few seconds (1440 MHz; NVIDIA
    H200, 2026-12-04). The refiner renders back to back, so its time is read at both rates."""
    out = a @ b
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            torch.matmul(a, b, out=out)
    flop = 20 * 2 * a.shape[0] ** 3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        rates.append(flop / (start.elapsed_time(end) / 1e3))
    del graph
    return statistics.median(rates[len(rates) // 2:])


def sustained_floor_ms(floor_ms: float, ceil: dict) -> float:
    """A floor read at the bf16 matrix rate of one product at a time (``ceilings``), read
    again at the rate the card keeps up (``sustained_rate``)."""
    return floor_ms * ceil["bf16_matmul_flop_per_s"] / ceil["bf16_matmul_sustained_flop_per_s"]


def weight_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (FP8 weights are buffers: counted too)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def floors_ms(cfg, ar, ceil: dict) -> dict:
    """The stages' floors in ms, at the measured ``ceilings``: an AR decode round reads every
    weight of ``ar`` once at the copy rate; a refiner render does its FLOPs at the bf16
    matrix rate."""
    return {"ar_round": weight_bytes(ar) / ceil["copy_bytes_per_s"] * 1e3,
            "refiner": render_flops(cfg)[0] / ceil["bf16_matmul_flop_per_s"] * 1e3}


def write_result(out: Path | None, name: str, result: dict) -> Path | None:
    """``result`` as indented JSON in OUT/``name``, where an OUT folder was given; its path."""
    if not out:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    return out / name


def load_gemv_tiles(path: Path) -> None:
    """benchmarks/gemv.py's best tile per weight shape (its JSON's ``best_tiles``) for
    helios::gemv, over helios.kernels.gemv.TILES."""
    from helios.kernels.gemv import TILES  # noqa: PLC0415 - triton, on CUDA machines only

    for shape, tile in json.loads(path.read_text())["best_tiles"].items():
        TILES[tuple(int(v) for v in shape.split("x"))] = tile


class TimedPipeline(HeliosPipeline):
    """The pipeline with a synchronised timer around every stage call; with ``overlap_decode``
    on CUDA, the renders and decodes are timed by CUDA events on their stream instead (GPU
    time, queue waits included), since a wait for each would undo the overlap measured."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.times: dict[str, list] = {k: [] for k in
                                       ("text_encoder", "ar_round", "refiner", "vae_decoder")}
        self._by_events = self.overlap_decode and self.device.type == "cuda"

    def _timed(self, key, fn, *args):
        if self._by_events and key in ("refiner", "vae_decoder"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            self.times[key].append((start, end))
            return out
        # The calling thread's stream only: with the plans prefetched (their own thread and
        # stream), a device-wide sync would serialise the stages this measures.
        wait = torch.cuda.current_stream(self.device).synchronize \
            if self.device.type == "cuda" else (lambda: None)
        wait()
        t = time.perf_counter()
        out = fn(*args)
        wait()
        self.times[key].append(time.perf_counter() - t)
        return out

    def stage_times(self) -> dict[str, list[float]]:
        """Seconds of each stage call so far (a pair of events waited for where timed so)."""
        def seconds(x):
            if isinstance(x, float):
                return x
            x[1].synchronize()
            return x[0].elapsed_time(x[1]) / 1e3
        return {k: [seconds(x) for x in v] for k, v in self.times.items()}

    def encode_prompt(self, prompt):
        return self._timed("text_encoder", super().encode_prompt, prompt)

    def ar_stream(self, *args):
        stream = super().ar_stream(*args)
        try:
            while True:
                try:
                    tokens = self._timed("ar_round", next, stream)
                except StopIteration:
                    return
                # A call brings up to a frame's tokens, decoded back to back: one round
                # (one token's step) each, each its share of the call.
                share = self.times["ar_round"].pop() / len(tokens)
                self.times["ar_round"] += [share] * len(tokens)
                yield tokens
        finally:
            stream.close()

    def refine(self, *args):
        return self._timed("refiner", super().refine, *args)

    def _queue_decode(self, *args):  # under decode() and refine_and_decode alike
        return self._timed("vae_decoder", super()._queue_decode, *args)


def time_forwards(ar, device) -> dict[str, list[float]]:
    """Collect the time of every model forward of the AR runtime (``ARRuntime.on_forward``),
    keyed by what it is: a draft step (1 new token), a target verification (k + 1 tokens), a
    plain target step."""
    times: dict[str, list[float]] = {"draft_step": [], "verify": [], "plain_step": []}

    def record(kind, seconds):
        if kind in times:
            times[kind].append(seconds)

    ar.on_forward = record
    return times


def speculative_table(cfg, forwards: dict, med: dict) -> dict:
    """FPS at acceptance 0.5 / 0.7 / 0.9 from the measured costs of a draft step and a
    k-token verification: with per-token acceptance a, a round of k drafts emits
    (1 - a^(k+1)) / (1 - a) tokens on average and costs k draft steps + one verification."""
    k = cfg.num_draft_tokens
    draft = statistics.median(forwards["draft_step"]) * 1e3
    verify = statistics.median(forwards["verify"]) * 1e3
    plain = statistics.median(forwards["plain_step"]) * 1e3 if forwards["plain_step"] else None
    n = cfg.plan_tokens_per_frame
    other = med["refiner"] + med["vae_decoder"]
    rows = []
    for a in (0.5, 0.7, 0.9):
        per_round = (1 - a ** (k + 1)) / (1 - a)
        ar_ms = n / per_round * (k * draft + verify)
        rows.append({"acceptance": a, "tokens_per_round": per_round, "ar_ms_per_latent_frame": ar_ms,
                     "fps": cfg.frames_per_latent / ((ar_ms + other) / 1e3)})
    return {"k": k, "draft_step_ms": draft, "verify_ms": verify, "plain_step_ms": plain,
            "refiner_plus_vae_ms": other, "table": rows}


@torch.no_grad()
def fp8_error(cfg, model, device, seed=0) -> dict:
    """Quantize ``model``'s projections to FP8 in place; return how far its next-token logits
    move: relative L2 error and top-1 agreement over 64 positions of a random context."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    prefix = (torch.randn(32, cfg.ar_backbone.hidden_size, generator=gen) * 0.02).to(device, dtype)
    tokens = torch.randint(0, cfg.ar_backbone.plan_vocab_size, (64,), generator=gen).tolist()

    def logits():
        rt = ARRuntime(model, num_blocks=8, block_size=64, device=device)
        rt.add_sequence(0, prefix, [], SamplingParams())
        rows = []
        for t in tokens:  # one position at a time, as decoding feeds them
            rows.append(rt.logits(0))
            rt.seqs[0].tokens.append(t)
        return torch.stack(rows).float()

    ref = logits()
    saved = quantize_ar(model)
    out = logits()
    return {"relative_l2": float((out - ref).norm() / ref.norm()),
            "max_abs": float((out - ref).abs().max()),
            "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "positions": len(tokens), "bytes_saved": saved}


@torch.no_grad()
def refiner_fp8_error(cfg, refiner, device, seed=0) -> dict:
    """Quantize ``refiner``'s block matmuls to FP8 in place (helios/fp8.py); return how far a
    rendered latent frame moves: relative L2 error over a full context (anchor and history),
    the same noise and plan tokens before and after, eager (uncompiled) both times."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(refiner.parameters()).dtype
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    noise, anchor = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    history = [torch.randn(shape, generator=gen).to(device, dtype)
               for _ in range(cfg.refiner.history_frames)]
    plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.refiner.plan_tokens_per_frame),
                         generator=gen).to(device)
    ref = refiner.render(noise, plan, anchor, history).float()
    saved = quantize_refiner(refiner)
    out = refiner.render(noise, plan, anchor, history).float()
    return {"relative_l2": float((out - ref).norm() / ref.norm()),
            "max_abs": float((out - ref).abs().max()), "bytes_saved": saved}


def step_gpu_ms(pipe, device, reps=30) -> dict:
    """GPU time of pieces on their own (CUDA events): one replay of the captured AR decode
    step; the refiner's context encoding and one denoising step at the full history, each
    launched from Python; and a whole render at the full history (one graph replay when
    captured)."""
    out = {}
    runner = pipe.ar.static_step(1)
    if device.type != "cuda":
        return out
    timed = lambda fn: gpu_ms(fn, reps)  # noqa: E731

    if runner is not None and runner.graph is not None:
        out["ar_graph_replay"] = timed(runner.graph.replay)
    cfg, rf = pipe.config, pipe.refiner
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    z = torch.randn(shape, device=device, dtype=pipe.dtype)
    plan = torch.zeros(1, cfg.plan_tokens_per_frame, dtype=torch.long, device=device)
    hist = [z] * cfg.refiner.history_frames
    with torch.no_grad():
        # The context encoding and a step as a render runs them (its modulation rows made
        # once, a step's its views), so the compiled pieces are the render's.
        sig_t = torch.tensor(rf.sigmas(), device=device)
        mods = rf._render_modulations(sig_t, 1)
        rows = modulation_level(mods, 0)[0]
        out["refiner_context"] = timed(lambda: rf.encode_context(plan, z, hist, mods=rows))
        kv = rf.encode_context(plan, z, hist, mods=rows)
        out["refiner_step"] = timed(lambda: rf.step(z, sig_t[0], kv, modulation_level(mods, 1)))
        out["refiner_render"] = timed(lambda: rf.render(z, plan, z, hist))
        out["vae_decoder"] = timed(lambda: pipe.vae.decode(z, z))
    return out


def profile_frames(pipe, prompt, out_dir, spec) -> str:
    """torch.profiler over a short video (2 latent frames): the top operators by GPU time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        pipe.generate_video(prompt, num_frames=2 * pipe.config.frames_per_latent, seed=3,
                            speculative=spec)
    key = "self_cuda_time_total" if pipe.device.type == "cuda" else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=30)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile.txt").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of the measured video")
    ap.add_argument("--speculative", choices=["on", "off"], default="off")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    ap.add_argument("--tag", default="", help="name of this variant in the JSON file name")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps")
    ap.add_argument("--low-vram", action="store_true", help="only the active stage on the GPU")
    ap.add_argument("--no-compile", action="store_true",
                    help="eager refiner, VAE decoder and AR decode steps")
    ap.add_argument("--ar-fp8", action="store_true",
                    help="FP8 AR weights; reports their logit error against bf16 first")
    ap.add_argument("--refiner-fp8", action="store_true",
                    help="the refiner's block matmuls in FP8; reports the rendered latent's "
                         "error against bf16 first")
    ap.add_argument("--prefetch-plans", action="store_true",
                    help="the AR decodes in a thread on its own CUDA stream while the refiner renders")
    ap.add_argument("--overlap-decode", choices=["auto", "on", "off"], default="auto",
                    help="queue the next latent frame's render before waiting for the last "
                         "one's decoded frames (HeliosPipeline(overlap_decode)); auto: on "
                         "CUDA only, as the pipeline does by default; renders and decodes are "
                         "then timed by CUDA events")
    ap.add_argument("--plan-tokens", type=int, default=None,
                    help="plan tokens per latent frame instead of the config's")
    ap.add_argument("--gemv-tiles", type=Path, default=None,
                    help="benchmarks/gemv.py's JSON: the tiles of helios::gemv (HELIOS_AR_GEMV)")
    ap.add_argument("--profile", action="store_true", help="write the top operators to OUT/profile.txt")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    settings = from_environment()  # HELIOS_FLASH_ATTENTION=0 etc., as the entry points read them
    attention.use_settings(settings)
    cfg = get_config(args.config)
    if args.plan_tokens:
        cfg = with_plan_tokens(cfg, args.plan_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceil = ceilings(device)
    t0 = time.perf_counter()
    parts = random_components(cfg, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    fp8 = fp8_error(cfg, parts["ar_backbone"], device) if args.ar_fp8 else None
    rf8 = refiner_fp8_error(cfg, parts["refiner"], device) if args.refiner_fp8 else None
    ar_runtime.use_settings(settings)
    if args.gemv_tiles:
        load_gemv_tiles(args.gemv_tiles)
    pipe = TimedPipeline(cfg, **parts, device=device, max_streams=1, low_vram=args.low_vram,
                         compile=not args.no_compile, cuda_graphs=not args.no_cuda_graphs,
                         prefetch_plans=args.prefetch_plans,
                         overlap_decode={"on": True, "off": False}.get(args.overlap_decode))
    forwards = time_forwards(pipe.ar, device)
    prompt = "a red circle moving left on a dark background"
    spec = args.speculative == "on"
    # Warm-up: one short video (kernels selected, allocator warm), not measured.
    # Enough latent frames that the refiner has seen every history length (the attention
    # kernel autotunes per context length) before the measured video.
    warm = (cfg.refiner.history_frames + 2) * cfg.frames_per_latent
    print(f"built in {build_s:.1f} s; warming up (compiles on CUDA)", flush=True)
    t0 = time.perf_counter()
    pipe.generate_video(prompt, num_frames=warm, seed=1, speculative=spec)
    warm_s = time.perf_counter() - t0
    print(f"warm-up video in {warm_s:.1f} s", flush=True)
    for v in list(pipe.times.values()) + list(forwards.values()):
        v.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    req = validate_request(cfg, prompt, duration_s=args.seconds, seed=0, speculative=spec)
    t = time.perf_counter()
    first, frames, first_parts = None, 0, {}
    for chunk in pipe.run(req):
        frames += len(chunk.frames)
        if first is None:
            first = time.perf_counter() - t
            # Where the first frame's time went: each stage's calls so far, in all (with the
            # plans prefetched, AR rounds run beside the refiner and overlap it).
            first_parts = {k: sum(v) * 1e3 for k, v in pipe.stage_times().items()}
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # With --low-vram the stages visit the GPU only while they run: no piece alone to time.
    pieces = {} if pipe.low_vram else step_gpu_ms(pipe, device)

    times = pipe.stage_times()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    n = cfg.plan_tokens_per_frame
    latent_frames = len(times["refiner"])
    ar_per_frame = sum(times["ar_round"]) * 1e3 / latent_frames
    ar = parts["ar_backbone"]
    ar_bytes = weight_bytes(ar)
    flops, projections, n_tokens, n_ctx = render_flops(cfg)
    result = {
        "config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu", "dtype": str(dtype).replace("torch.", ""),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "speculative": spec,
        "cuda_graphs": pipe.ar.cuda_graphs, "attention": attention.backend()
        if device.type == "cuda" else "reference", "prefetch_plans": pipe.prefetch_plans,
        "overlap_decode": pipe.overlap_decode,
        "video_frames": frames, "latent_frames": latent_frames, "wall_s": wall,
        "fps": frames / wall, "first_frame_s": first, "first_frame_stage_ms": first_parts,
        "peak_gpu_bytes": peak,
        "build_s": build_s, "warmup_s": warm_s, "median_ms": med, "ar_ms_per_latent_frame": ar_per_frame,
        "refiner_tokens": n_tokens, "refiner_context_tokens": n_ctx, "ceilings": ceil,
        "low_vram": args.low_vram, "accelerated": pipe.accelerated, "ar_fp8": fp8,
        "refiner_fp8": rf8,
        "gpu_ms_alone": pieces,
        "ar_gemv": settings.ar_gemv,
        "qkv_pack": settings.qkv_pack,
        "qkv_rows": settings.qkv_rows,
        "residual_norm": settings.residual_norm,
        "ar_step_tuning": settings.ar_step_tuning,
        "ar_step_compiled": bool(pipe.ar.static_step(1) and pipe.ar.static_step(1).compiled),
    }
    if spec:
        result["speculative_costs"] = speculative_table(cfg, forwards, med)
        result["speculative_costs"]["measured_acceptance"] = pipe.ar.acceptance_rate()
    if ceil:
        floors = result["floors_ms"] = floors_ms(cfg, ar, ceil)
        if rf8:  # the projections at the FP8 rate, attention still at the bf16 one
            floors["refiner"] = (projections / ceil["fp8_matmul_flop_per_s"]
                                 + (flops - projections) / ceil["bf16_matmul_flop_per_s"]) * 1e3
        result["floor_ratio"] = {k: med[k] / floors[k] for k in ("ar_round", "refiner")}
        if not rf8:
            floors["refiner_sustained"] = sustained_floor_ms(floors["refiner"], ceil)
        result["achieved"] = {"ar_bytes_per_s": ar_bytes / (med["ar_round"] / 1e3),
                              "refiner_flop_per_s": flops / (med["refiner"] / 1e3)}

    print(f"\nHelios {cfg.name} on {result['device']} ({result['dtype']}), speculative "
          f"{'on' if spec else 'off'}, CUDA graphs {'on' if pipe.ar.cuda_graphs else 'off'}, AR "
          f"{'prefetched beside' if pipe.prefetch_plans else 'before'} the refiner, "
          f"{'decodes overlapped, ' if pipe.overlap_decode else ''}attention "
          f"{result['attention']}: {frames} frames ({latent_frames} latent) in {wall:.2f} s")
    print(f"{'stage':<14} {'median ms':>10} {'floor ms':>9} {'ratio':>6}   note")
    floors = result.get("floors_ms", {})
    for key, note in (("text_encoder", "once per request"),
                      ("ar_round", f"one decode round; {n} per latent frame"),
                      ("refiner", f"context + {cfg.refiner.num_steps} steps, {n_tokens}+{n_ctx} tokens"),
                      ("vae_decoder", "4 frames")):
        if key in med:
            fl = floors.get(key)
            print(f"{key:<14} {med[key]:>10.2f} {fl if fl else float('nan'):>9.2f} "
                  f"{med[key] / fl if fl else float('nan'):>6.2f}   {note}")
    print(f"AR per latent frame {ar_per_frame:.1f} ms; FPS {result['fps']:.2f} "
          f"(target 24); first frame {first * 1e3:.0f} ms"
          + (f"; peak GPU memory {peak / 2**30:.1f} GiB" if peak else ""))
    print("first frame by stage: " + ", ".join(f"{k} {v:.1f} ms" for k, v in first_parts.items()))
    if ceil:
        print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
              f"{ceil['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s (kept up: "
              f"{ceil['bf16_matmul_sustained_flop_per_s'] / 1e12:.0f}), fp8 matmul "
              f"{ceil['fp8_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    if "refiner_sustained" in floors:
        print(f"refiner at the matrix rate kept up: floor {floors['refiner_sustained']:.2f} ms, "
              f"ratio {med['refiner'] / floors['refiner_sustained']:.2f}"
              + (f", the render alone {pieces['refiner_render'] / floors['refiner_sustained']:.2f}"
                 if "refiner_render" in pieces else ""))
    if pieces:
        print("GPU time alone (CUDA events): " + ", ".join(f"{k} {v:.2f} ms" for k, v in pieces.items()))
    if fp8:
        print(f"FP8 AR weights: logits relative L2 error {fp8['relative_l2']:.4f}, max abs "
              f"{fp8['max_abs']:.3f}, top-1 agreement {fp8['top1_agreement']:.3f} over "
              f"{fp8['positions']} positions; {fp8['bytes_saved'] / 1e9:.1f} GB saved")
    if rf8:
        print(f"FP8 refiner matmuls: rendered latent relative L2 error {rf8['relative_l2']:.4f}, "
              f"max abs {rf8['max_abs']:.3f}; {rf8['bytes_saved'] / 1e9:.2f} GB saved")
    if args.profile:
        print(profile_frames(pipe, prompt, args.out, spec)[:6000])
    if spec:
        c = result["speculative_costs"]
        print(f"speculative: draft step {c['draft_step_ms']:.2f} ms, verification of "
              f"{c['k']} drafts {c['verify_ms']:.2f} ms; "
              f"measured acceptance {c['measured_acceptance']:.2f}")
        print(f"{'acceptance':>10} {'tokens/round':>12} {'AR ms/latent':>12} {'FPS':>6}")
        for row in c["table"]:
            print(f"{row['acceptance']:>10.2f} {row['tokens_per_round']:>12.2f} "
                  f"{row['ar_ms_per_latent_frame']:>12.1f} {row['fps']:>6.2f}")
    path = write_result(args.out, f"fps_{cfg.name}_{device.type}"
                                  f"{'_' + args.tag if args.tag else ''}.json", result)
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

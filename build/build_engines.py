"""Build the TensorRT engines of text_encoder, refiner_step and vae_decoder from their ONNX.

    python build/build_engines.py --checkpoint CKPT --onnx build-out/onnx --out engines \\
        [--fp8] [--timing-cache engines/timing.cache] [--max-streams 4]

Optimisation profiles come from the checkpoint's config: prompt length 3 .. max_prompt_bytes+2,
refiner context length plan tokens .. plan + (1 + history_frames) compressed frames, refiner
batch 1 .. max-streams. bf16 kernels (fp32 I/O); --fp8 adds FP8 kernels where the graph has
Q/DQ nodes. The refiner graph is the plugin variant: helios/export/trt_context_attention.py
registers helios::ContextAttention before parsing, by default with its ahead-of-time
implementation (the Triton kernel compiled to PTX and embedded in the plan), so that Triton's
C++ tensorrt_plan backend runs the engine without Python.

Verified where: written against the TensorRT 10 Python API; not run here (TensorRT's builder is
not installable on the development machines). The ONNX it reads is tested against PyTorch in
ONNX Runtime (tests/test_onnx_export.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from helios.checkpoint import read_config


def profiles(cfg, max_streams: int) -> dict[str, dict[str, tuple]]:
    """(min, opt, max) shape of every dynamic input, per engine."""
    rf = cfg.refiner
    lat = (rf.latent_channels, cfg.latent_height, cfg.latent_width)
    hp = rf.patch_size * rf.history_pool
    per_frame = (cfg.latent_height // hp) * (cfg.latent_width // hp)
    ctx_min, ctx_max = rf.plan_tokens_per_frame, rf.plan_tokens_per_frame + (1 + rf.history_frames) * per_frame
    kv = lambda b, n: (rf.num_layers, b, rf.num_heads, n, rf.head_dim)  # noqa: E731
    longest = cfg.text_encoder.max_prompt_bytes + 2
    return {
        "text_encoder": {"input_ids": ((1, 3), (1, 64), (1, longest)),
                         "input_lengths": ((1,), (1,), (1,))},
        "refiner_step": {"latent": ((1, *lat), (1, *lat), (max_streams, *lat)),
                         "sigma": ((1,), (1,), (1,)),
                         "context_k": (kv(1, ctx_min), kv(1, ctx_max), kv(max_streams, ctx_max)),
                         "context_v": (kv(1, ctx_min), kv(1, ctx_max), kv(max_streams, ctx_max))},
        "vae_decoder": {"latent": (lat, lat, lat), "prev_latent": (lat, lat, lat)},
    }


def build(onnx_path: Path, plan_path: Path, shapes: dict, fp8: bool, timing_cache: Path | None):
    import tensorrt as trt  # noqa: PLC0415

    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"{onnx_path}: the ONNX parser failed:\n{errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.BF16)
    if fp8:
        config.set_flag(trt.BuilderFlag.FP8)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit(f"{onnx_path}: TensorRT could not build an engine")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    print(f"wrote {plan_path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--onnx", type=Path, default=ROOT / "build-out" / "onnx")
    ap.add_argument("--out", type=Path, default=ROOT / "engines")
    ap.add_argument("--max-streams", type=int, default=4)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--timing-cache", type=Path, default=None)
    ap.add_argument("--jit-plugin", action="store_true",
                    help="the Python-callback plugin instead of the embedded PTX (such an "
                         "engine only runs in a Python process, not in Triton's tensorrt_plan)")
    args = ap.parse_args(argv)
    import helios.export.trt_context_attention as plugin  # noqa: PLC0415  registers helios::ContextAttention

    plugin.use_jit() if args.jit_plugin else plugin.use_aot()

    shapes = profiles(read_config(args.checkpoint), args.max_streams)
    for engine, onnx_name in (("text_encoder", "text_encoder"), ("refiner_step", "refiner_step.plugin"),
                              ("vae_decoder", "vae_decoder")):
        build(args.onnx / f"{onnx_name}.onnx", args.out / f"{engine}.plan", shapes[engine],
              args.fp8, args.timing_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fill the model repository templates (``${name}`` placeholders) for one deployment.

    python -m helios_triton.fill_repository --checkpoint weights/helios-tiny --out .triton/model_repository
    python -m helios_triton.fill_repository --checkpoint /models/helios-14b --device cuda \\
        --out /repo --refiner-instances 1 --max-streams 4 --speculative off
    python -m helios_triton.fill_repository --checkpoint /models/helios-14b --device cuda \\
        --out /repo --stages fused --max-streams 4 --speculative off  # every stage in helios

The templates are the folders ``model_repository/`` (torch flavour) and
``model_repository_tensorrt/`` (the TensorRT flavour's replacements) of the source tree, found
under the working directory unless ``--templates`` names another copy.

Values that follow from the checkpoint (hidden sizes, latent and frame shapes, plan tokens per
frame) are read from it; the rest are options. Every placeholder must be filled: a template
that keeps one is an error, so a new placeholder cannot slip through unset.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from helios.checkpoint import read_config
from helios.errors import HeliosError

PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
GPU_SHARE_MODELS = ("ar_backbone", "refiner", "vae_decoder")
# What a client calls; with --stages fused these alone make the repository.
CLIENT_MODELS = ("helios", "helios_video", "helios_update")
# The most streams one server is filled for: with the stage models each is an instance of
# helios (a process), and at 14b on an H200 eight already share the GPU at under 7 FPS each.
MAX_STREAMS = 32
# The most instances of a stage model: each is a process that holds its own weights.
MAX_INSTANCES = 16


def gpu_shares(items: list[str]) -> dict[str, int]:
    """``--gpu-share MODEL=PERCENT`` items as {model: percent}."""
    out = {}
    for item in items:
        model, _, pct = item.partition("=")
        if model not in GPU_SHARE_MODELS or not pct.isdigit() or not 1 <= int(pct) <= 100:
            raise HeliosError("gpu-share", f"must be MODEL=PERCENT with MODEL in "
                                           f"{list(GPU_SHARE_MODELS)} and PERCENT in [1, 100], "
                                           f"got {item!r}")
        out[model] = int(pct)
    return out


def values(checkpoint: Path, device: str, max_streams: int, speculative: bool, instances: dict,
           kv_fraction: float, flavour: str = "torch", engine_dir: Path | None = None,
           instance_kind: str = "auto", ar_fp8: bool = False,
           overlap_decode: str = "auto", refiner_fp8: bool = False,
           gpu_share: dict[str, int] | None = None, stages: str = "models",
           prefetch_plans: bool = False) -> dict[str, str]:
    check_counts(max_streams, instances, kv_fraction)
    cfg = read_config(checkpoint)
    if flavour == "tensorrt":
        device = "cuda"
        speculative = False  # TensorRT-LLM's draft-target decoding is not wired to helios yet
    latent = (cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    blocks = max_streams * cfg.kv_blocks_per_stream()
    gpu = device == "cuda"
    return {
        "checkpoint": str(checkpoint.resolve()),
        "max_prompt_bytes": str(cfg.text_encoder.max_prompt_bytes),
        "device": device,
        "dtype": "auto",
        # KIND_CPU with device=cuda: the torch code still runs on the GPU (model_device), but
        # Triton's python backend treats the instance as a CPU one (no CUDA IPC pool).
        "instance_kind": ("KIND_GPU" if gpu else "KIND_CPU") if instance_kind == "auto" else instance_kind,
        # TensorRT-LLM takes the prompt table in FP16; the torch runtime keeps FP32.
        "table_dtype": "TYPE_FP16" if flavour == "tensorrt" else "TYPE_FP32",
        "engine_dir": str((engine_dir or Path("engines")).resolve()),
        "refiner_layers": str(cfg.refiner.num_layers),
        "refiner_heads": str(cfg.refiner.num_heads),
        "refiner_head_dim": str(cfg.refiner.head_dim),
        "ar_hidden_size": str(cfg.ar_backbone.hidden_size),
        "draft_hidden_size": str(cfg.draft.hidden_size),
        "plan_tokens_per_frame": str(cfg.plan_tokens_per_frame),
        "latent_shape": ", ".join(map(str, latent)),
        "frames_shape": f"{cfg.frames_per_latent}, {cfg.height}, {cfg.width}, 3",
        "height": str(cfg.height),
        "width": str(cfg.width),
        "ar_max_batch_size": str(max_streams),
        "max_tokens_in_paged_kv_cache": str(blocks * cfg.kv_block_size),
        "kv_cache_free_gpu_mem_fraction": str(kv_fraction) if gpu else "",
        "kv_cache_block_size": str(cfg.kv_block_size),
        "cancellation_check_period_ms": "50",
        "ar_weight_quantization": "fp8" if ar_fp8 else "none",
        "refiner_weight_quantization": "fp8" if refiner_fp8 else "none",
        "speculative_decoding_mode": "draft_target" if speculative else "none",
        "num_draft_tokens": str(cfg.num_draft_tokens),
        "speculative": "on" if speculative else "off",
        # Decoding beside the next rendering pays on a GPU (+8 % at one stream on the H100)
        # and costs on a CPU, where both stages share the same cores (tiny, 2 cores: 66 ->
        # 26-39 FPS at one stream): docs/serving.md.
        "overlap_decode": ("on" if gpu else "off") if overlap_decode == "auto" else overlap_decode,
        "slot_bias": "off" if flavour == "tensorrt" else "on",
        "text_encoder_instances": str(instances["text_encoder"]),
        "refiner_instances": str(instances["refiner"]),
        "vae_decoder_instances": str(instances["vae_decoder"]),
        "helios_video_instances": str(instances["helios_video"]),
        "helios_instances": "1" if stages == "fused" else str(max_streams),
        "stages": stages,
        "prefetch_plans": "on" if prefetch_plans else "off",
        "max_streams": str(max_streams),
        **{f"{m}_gpu_share": str((gpu_share or {}).get(m, "")) for m in GPU_SHARE_MODELS},
    }


def fill(out: Path, vals: dict[str, str], templates: Path = Path("model_repository"),
         flavour: str = "torch", fused: bool = False) -> list[Path]:
    """Copy the repository to ``out`` with every config.pbtxt filled; returns the configs.
    ``templates`` is the torch flavour's folder; the TensorRT flavour's replacements are the
    folder beside it, ``model_repository_tensorrt``. ``fused``: only the client-facing models
    (``helios`` runs every stage itself)."""
    if not (templates / "helios" / "config.pbtxt").is_file():
        raise HeliosError("templates", f"must be the model_repository folder of the source tree, "
                                       f"got {str(templates)!r} (run from the repository root)")
    if out.exists():
        shutil.rmtree(out)
    ignore = shutil.ignore_patterns("__pycache__", "*.md")
    shutil.copytree(templates, out, ignore=ignore)
    if flavour == "tensorrt":
        overlay = templates.parent / "model_repository_tensorrt"
        for model in sorted(p for p in overlay.iterdir() if p.is_dir()):
            if (out / model.name).exists():
                shutil.rmtree(out / model.name)
            shutil.copytree(model, out / model.name, ignore=ignore)
    if fused:
        for model in sorted(p for p in out.iterdir() if p.is_dir()):
            if model.name not in CLIENT_MODELS:
                shutil.rmtree(model)
    configs = sorted(out.glob("*/config.pbtxt"))
    for path in configs:
        # Version 1 of every model; an ensemble's is an empty folder, which git does not keep.
        (path.parent / "1").mkdir(exist_ok=True)
        text = path.read_text()
        missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in vals})
        if missing:
            raise SystemExit(f"{path}: no value for placeholder(s) {', '.join(missing)}")
        path.write_text(PLACEHOLDER.sub(lambda m: vals[m.group(1)], text))
    return configs


def check_counts(max_streams: int, instances: dict[str, int], kv_fraction: float) -> None:
    """The numeric options in their ranges, or HeliosError naming the option."""
    if not 1 <= max_streams <= MAX_STREAMS:
        raise HeliosError("max-streams", f"must be in [1, {MAX_STREAMS}], got {max_streams}")
    for model, n in instances.items():
        if not 1 <= n <= MAX_INSTANCES:
            raise HeliosError(f"{model.replace('_', '-')}-instances",
                              f"must be in [1, {MAX_INSTANCES}], got {n}")
    if not 0 < kv_fraction <= 1:
        raise HeliosError("kv-cache-free-gpu-mem-fraction", f"must be in (0, 1], got {kv_fraction}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("weights/helios-tiny"))
    ap.add_argument("--out", type=Path, default=Path(".triton/model_repository"))
    ap.add_argument("--templates", type=Path, default=Path("model_repository"),
                    help="the model_repository folder of the source tree")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--flavour", choices=["torch", "tensorrt"], default="torch",
                    help="stage models on the torch runtime, or TensorRT / TensorRT-LLM engines")
    ap.add_argument("--engine-dir", type=Path, default=Path("engines"),
                    help="tensorrt flavour: where build/ wrote the engines")
    ap.add_argument("--max-streams", type=int, default=8, help="concurrent AR streams (KV pool)")
    ap.add_argument("--speculative", choices=["on", "off"], default="on")
    ap.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.5)
    ap.add_argument("--ar-fp8", action="store_true", help="torch flavour: FP8 AR weights")
    ap.add_argument("--refiner-fp8", action="store_true",
                    help="torch flavour: the refiner's block matmuls in FP8 (helios/fp8.py)")
    ap.add_argument("--overlap-decode", choices=["auto", "on", "off"], default="auto",
                    help="helios decodes a latent frame while the next renders (auto: on with cuda)")
    ap.add_argument("--instance-kind", choices=["auto", "KIND_GPU", "KIND_CPU"], default="auto",
                    help="auto: KIND_GPU on cuda; KIND_CPU keeps device=cuda for the torch code")
    ap.add_argument("--stages", choices=["models", "fused"], default="models",
                    help="models: the stage models behind helios (BLS); fused: every stage in "
                         "the helios model's process, --max-streams streams at once (torch flavour)")
    ap.add_argument("--prefetch-plans", action="store_true",
                    help="with --stages fused and --max-streams 1: the AR decodes ahead in a "
                         "thread of its own while the refiner renders")
    ap.add_argument("--gpu-share", action="append", default=[], metavar="MODEL=PERCENT",
                    help="under CUDA MPS, the share of the GPU's SMs a stage's kernels may use "
                         "(ar_backbone, refiner, vae_decoder; repeatable; default all)")
    for name, default in (("text-encoder", 1), ("refiner", 1), ("vae-decoder", 1), ("helios-video", 2)):
        ap.add_argument(f"--{name}-instances", type=int, default=default)
    args = ap.parse_args(argv)
    instances = {k: getattr(args, f"{k}_instances") for k in
                 ("text_encoder", "refiner", "vae_decoder", "helios_video")}
    try:
        vals = values(args.checkpoint, args.device, args.max_streams, args.speculative == "on",
                      instances, args.kv_cache_free_gpu_mem_fraction, args.flavour,
                      args.engine_dir, args.instance_kind, args.ar_fp8, args.overlap_decode,
                      args.refiner_fp8, gpu_shares(args.gpu_share), args.stages,
                      args.prefetch_plans)
        if args.prefetch_plans and args.stages != "fused":
            raise HeliosError("prefetch-plans", "needs --stages fused: with the stage models "
                                                "the AR runs ahead in its own process already")
        if args.prefetch_plans and args.max_streams != 1:
            raise HeliosError("prefetch-plans", f"needs --max-streams 1, got {args.max_streams}: "
                                                "with several fused streams the shared AR "
                                                "scheduler decodes ahead already")
        if args.stages == "fused" and args.flavour != "torch":
            raise HeliosError("stages", "fused runs the torch stages; the tensorrt flavour's "
                                        "stages are engines behind their own models")
        paths = fill(args.out, vals, args.templates, flavour=args.flavour,
                     fused=args.stages == "fused")
    except HeliosError as e:
        print(f"fill_repository: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"filled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

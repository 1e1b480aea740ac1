"""``helios`` command line: init, info, generate, train, eval.

Every bad input ends as one line on stderr naming the field and the allowed range, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .errors import HeliosError
from .settings import from_environment
from .training import FINETUNE_STEPS, PHASES, TrainSettings

EXIT_BAD_INPUT = 2


# The trained tiny checkpoint that ships with the source tree.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "helios-tiny"


def default_checkpoint() -> Path:
    """$HELIOS_CHECKPOINT, else the shipped trained tiny checkpoint, else (an installed
    package without the source tree) checkpoints/tiny under the working directory."""
    chosen = from_environment().checkpoint
    if chosen is not None:
        return chosen
    if (SHIPPED_CHECKPOINT / "model_index.json").is_file():
        return SHIPPED_CHECKPOINT
    return Path("checkpoints/tiny")


def _float(name):
    def parse(s):
        try:
            return float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
    return parse


def _int(name):
    def parse(s):
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
    return parse


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HeliosError("prompt_at", f"seconds must be a number, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="helios", description="Helios text-to-video")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a random-initialised checkpoint")
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_int("seed"), default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="make the random weights there (cuda: fast, for the 14b config)")

    p = sub.add_parser("info", help="parameter counts of a configuration (allocates nothing)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="generate a video into an mp4")
    p.add_argument("--prompt", required=True)
    p.add_argument("--duration", type=_float("duration"), default=2.0, help="seconds")
    p.add_argument("--output", default="out.mp4")
    p.add_argument("--config", default=None, help="expected configuration of the checkpoint")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (default: $HELIOS_CHECKPOINT, else the shipped weights/helios-tiny)")
    p.add_argument("--seed", type=_int("seed"), default=0)
    p.add_argument("--temperature", type=_float("temperature"), default=0.7)
    p.add_argument("--top-k", type=_int("top_k"), default=0)
    p.add_argument("--top-p", type=_float("top_p"), default=1.0)
    p.add_argument("--fps", type=_int("fps"), default=None)
    p.add_argument("--image", default=None, help="first frame (image-to-video)")
    p.add_argument("--video", default=None,
                   help="a clip of 4 to 120 frames to continue (video-to-video); the output is "
                        "the continuation")
    p.add_argument("--prompt-at", nargs=2, action="append", default=[],
                   metavar=("SECONDS", "PROMPT"),
                   help="switch to PROMPT at SECONDS into the video (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--low-vram", action="store_true", help="only the active stage on the GPU")
    p.add_argument("--no-speculative", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train", help="train every phase, or fine-tune a checkpoint on videos")
    p.add_argument("--out", required=True, help="output checkpoint folder (resumes if it exists)")
    p.add_argument("--config", default=None,
                   help="configuration (default: tiny from scratch, the --init checkpoint's "
                        "with --init; a different one with --init takes the tensors whose "
                        "names and shapes match, the rest start random)")
    p.add_argument("--init", default=None, help="checkpoint to start from (fine-tuning)")
    p.add_argument("--data", default=None,
                   help="folder of videos with .txt caption sidecars or a captions.csv "
                        "(default: synthetic captioned clips)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of "
                   + ",".join(PHASES))
    p.add_argument("--steps", default="", help="steps per phase, e.g. vae=200,ar=300")
    p.add_argument("--bank-clips", type=_int("bank_clips"), default=None,
                   help="clips encoded into the latent bank for the refiner/AR/draft phases")
    p.add_argument("--caption-dropout", type=_float("caption_dropout"), default=None,
                   help="AR phase: chance that each colour / shape word of a synthetic caption "
                        "is left out (default 0.25)")
    p.add_argument("--switch-clips", type=_int("switch_clips"), default=None,
                   help="AR phase: prompt-switch clips encoded into a bank of their own "
                        "(default 0: none)")
    p.add_argument("--switch-windows", type=_float("switch_windows"), default=None,
                   help="AR phase: share of AR windows that are prompt switches (needs "
                        "--switch-clips)")
    p.add_argument("--long-clips", type=_int("long_clips"), default=None,
                   help="AR phase: long-session clips (a clip's first frames, then its frames "
                        "up to 35 latent frames later) encoded into a bank of their own "
                        "(default 0: none)")
    p.add_argument("--long-windows", type=_float("long_windows"), default=None,
                   help="AR phase: share of continuation windows cut from long-session clips "
                        "(needs --long-clips)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=_int("seed"), default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="prompt adherence, flicker, drift, speculative acceptance")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompts", type=_int("prompts"), default=24, help="held-out prompts")
    p.add_argument("--frames", type=_int("frames"), default=32, help="frames per video")
    p.add_argument("--long-seconds", type=_float("long_seconds"), default=60.0,
                   help="length of the drift video (0 skips it)")
    p.add_argument("--seed", type=_int("seed"), default=0)
    p.add_argument("--true-plans", action="store_true",
                   help="also score videos made from the ground-truth clips' plan tokens (no AR)")
    p.add_argument("--switches", type=_int("switches"), default=0,
                   help="also score this many prompt switches (pairs of held-out prompts, "
                        "switched 2 s into a 5 s video)")
    p.add_argument("--continuations", type=_int("continuations"), default=0,
                   help="also score this many continuations of held-out clips (video-to-video)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    return ap


def load_pipeline(checkpoint: Path, device: str, **kw):
    """The pipeline with the speed switches of the environment (``helios.settings``)."""
    from . import attention  # noqa: PLC0415
    from . import ar_runtime  # noqa: PLC0415
    from .pipeline import HeliosPipeline  # noqa: PLC0415

    settings = from_environment()
    attention.use_settings(settings)
    ar_runtime.use_settings(settings)
    return HeliosPipeline.from_checkpoint(checkpoint, device=device, compile=settings.compile,
                                          cuda_graphs=settings.cuda_graphs, **kw)


def cmd_init(args) -> None:
    from .checkpoint import init_checkpoint  # noqa: PLC0415

    out = init_checkpoint(args.config, args.out, seed=args.seed, dtype=args.dtype,
                          device=args.device)
    print(f"wrote {args.config} checkpoint (seed {args.seed}) to {out}")


def cmd_info(args) -> None:
    from .checkpoint import count_parameters  # noqa: PLC0415
    from .config import get_config  # noqa: PLC0415

    cfg = get_config(args.config)
    counts = count_parameters(cfg)
    total = sum(counts.values())
    if args.json:
        print(json.dumps({"config": cfg.name, "parameters": counts, "total": total}))
        return
    print(f"config {cfg.name}: {cfg.width}x{cfg.height} @ {cfg.fps} fps, latent "
          f"{cfg.vae.latent_channels}x{cfg.latent_height}x{cfg.latent_width}, "
          f"{cfg.plan_tokens_per_frame} plan tokens per latent frame")
    for name, n in counts.items():
        print(f"  {name:<14} {n:>16,d}  ({n / 1e9:7.3f} B)")
    print(f"  {'total':<14} {total:>16,d}  ({total / 1e9:7.3f} B)")


def cmd_generate(args) -> None:
    import torch  # noqa: PLC0415

    from .checkpoint import init_checkpoint, read_config  # noqa: PLC0415
    from .pipeline import validate_request  # noqa: PLC0415
    from .session import scripted  # noqa: PLC0415
    from .schedule import MAX_VIDEO_FRAMES  # noqa: PLC0415
    from .video import Mp4Writer, check_output, partial_path, read_clip, read_image  # noqa: PLC0415

    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if args.checkpoint is None and not ckpt.exists():
        print(f"helios: no checkpoint at {ckpt}; writing the default tiny one (seed 0)",
              file=sys.stderr)
        init_checkpoint("tiny", ckpt, seed=0)
    cfg = read_config(ckpt)
    if args.config is not None and args.config != cfg.name:
        raise HeliosError("config", f"must match the checkpoint's configuration {cfg.name!r}, "
                                    f"got {args.config!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HeliosError("device", "must be 'cpu' here: CUDA is not available")
    output = check_output(args.output)
    image = read_image(args.image) if args.image else None
    video = read_clip(args.video, MAX_VIDEO_FRAMES) if args.video else None
    # Validate everything before loading weights, so that bad input costs nothing.
    req = validate_request(cfg, args.prompt, duration_s=args.duration, fps=args.fps,
                           seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, image=image, speculative=not args.no_speculative,
                           video=video)
    switches = scripted(cfg, req.num_frames, req.fps, [(_seconds(at), prompt)
                                                       for at, prompt in args.prompt_at])
    pipe = load_pipeline(ckpt, args.device, low_vram=args.low_vram)
    t0 = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=req.num_frames, unit="frame", desc="generating", file=sys.stderr)
    partial = partial_path(output)  # renamed when complete: no half video under the name
    try:
        with Mp4Writer(partial, req.fps, cfg.width, cfg.height) as writer:
            for chunk in pipe.run(req, switches):
                writer.write(chunk.frames)
                if bar is not None:
                    bar.update(len(chunk.frames))
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    for switch in switches.applied:
        print(f"prompt from frame {switch.frame}: {switch.prompt}", file=sys.stderr)
    acc = pipe.ar.acceptance_rate()
    spec = f", speculative acceptance {acc:.2f}" if not math.isnan(acc) else ""
    print(f"wrote {writer.frames_written} frames ({cfg.width}x{cfg.height}, {req.fps} fps) "
          f"to {args.output} in {dt:.1f} s ({writer.frames_written / dt:.1f} frames/s{spec})")


def _steps(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in PHASES or not value.isdigit() or int(value) < 1:
            raise HeliosError("steps", f"must be PHASE=N pairs with PHASE in {list(PHASES)} and "
                                       f"N >= 1, got {item!r}")
        out[name] = int(value)
    return out


def cmd_train(args) -> None:
    import torch  # noqa: PLC0415

    from .training.trainer import Trainer  # noqa: PLC0415

    phases = [s for s in args.phases.split(",") if s]
    bad = [s for s in phases if s not in PHASES]
    if bad or not phases:
        raise HeliosError("phases", f"must be a comma-separated subset of {list(PHASES)}, "
                                    f"got {args.phases!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HeliosError("device", "must be 'cpu' here: CUDA is not available")
    settings = TrainSettings()
    init = args.init
    if args.data is not None:
        settings.steps.update(FINETUNE_STEPS)
        init = init or str(default_checkpoint())
    settings.steps.update(_steps(args.steps))
    if args.bank_clips is not None:
        settings.bank_clips = args.bank_clips
    for name, share in (("caption_dropout", True), ("switch_clips", False),
                        ("switch_windows", True), ("long_clips", False), ("long_windows", True)):
        value = getattr(args, name)  # a share in [0, 1], or a number of clips
        if value is None:
            continue
        if share and not 0 <= value <= 1:
            raise HeliosError(name, f"must be in [0, 1], got {value}")
        if not share and value < 0:
            raise HeliosError(name, f"must be >= 0, got {value}")
        setattr(settings, name, value)
    trainer = Trainer(args.out, args.config, init=init, data=args.data, device=args.device,
                      seed=args.seed, settings=settings, progress=not args.no_progress)
    rejected = getattr(trainer.source, "rejected", [])
    if args.data is not None:
        print(f"data: {len(trainer.source.clips)} videos used, {len(rejected)} skipped",
              file=sys.stderr)
        for name, why in rejected:
            print(f"helios: skipped {name}: {why}", file=sys.stderr)
    losses = trainer.run(phases)
    for phase, values in losses.items():
        k = max(1, len(values) // 10)
        print(f"{phase}: loss {sum(values[:k]) / k:.4f} -> {sum(values[-k:]) / k:.4f} "
              f"over {len(values)} steps")
    print(f"wrote checkpoint to {args.out}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate, table, write_json  # noqa: PLC0415

    for name, value, low in (("prompts", args.prompts, 1), ("frames", args.frames, 8),
                             ("switches", args.switches, 0),
                             ("continuations", args.continuations, 0)):
        if value < low:
            raise HeliosError(name, f"must be an integer >= {low}, got {value}")
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    from .checkpoint import read_config  # noqa: PLC0415

    longest = read_config(ckpt).max_duration_s
    if not 0 <= args.long_seconds <= longest:
        raise HeliosError("long_seconds", f"must be in [0, {longest:g}], got {args.long_seconds}")
    pipe = load_pipeline(ckpt, args.device)
    result = evaluate(pipe, args.prompts, args.frames, args.long_seconds, args.seed,
                      progress=not args.no_progress, true_plans=args.true_plans,
                      switches=args.switches, continuations=args.continuations)
    result["checkpoint"] = str(ckpt)
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line message
        return EXIT_BAD_INPUT if e.code else 0
    try:
        {"init": cmd_init, "info": cmd_info, "generate": cmd_generate, "train": cmd_train,
         "eval": cmd_eval}[args.command](args)
    except HeliosError as e:
        print(f"helios: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("helios: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare the exported graphs with PyTorch through polygraphy.

    python -m helios.export.compare --checkpoint CKPT --onnx build-out/onnx            # ONNX Runtime
    python -m helios.export.compare --checkpoint CKPT --onnx build-out/onnx --trt      # + TensorRT

For each graph: fresh random inputs (other sizes than the export used) and the PyTorch
outputs are saved in polygraphy's formats, then

    polygraphy run MODEL.onnx --onnxrt [--trt] --load-inputs IN.json --load-outputs TORCH.json

compares every runner against PyTorch. The plugin graph runs only in TensorRT, and only in a
process that has imported helios/export/trt_context_attention.py (a Python-registered plugin, which
polygraphy's --plugins, a loader of shared libraries, cannot load): with --trt this script
imports it and compares that graph in-process.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch


from helios.export.onnx_export import (RefinerStepGraph, TextEncoderGraph, VAEDecoderGraph,
                                example_inputs)
from helios.checkpoint import load_component, read_config

TOLERANCE = {"text_encoder": (1e-4, 1e-4), "refiner_step": (1e-4, 1e-4),
             "refiner_step.plugin": (1e-2, 1e-2), "vae_decoder": (1.0, 0.0)}  # uint8: one level


@torch.no_grad()
def references(checkpoint: Path):
    """{graph name: (input dict, output dict)} from PyTorch on fresh inputs."""
    cfg = read_config(checkpoint)
    te = TextEncoderGraph(load_component(checkpoint, "text_encoder", cfg))
    rf = RefinerStepGraph(load_component(checkpoint, "refiner", cfg))
    vae = VAEDecoderGraph(load_component(checkpoint, "vae", cfg))
    ids, lengths = example_inputs(cfg, "text_encoder", prompt_len=29, seed=11)
    latent, sigma, k, v = example_inputs(cfg, "refiner_step", context_len=33, batch=2, seed=12)
    z, prev = example_inputs(cfg, "vae_decoder", seed=13)
    a, b = te(ids, lengths)
    refiner = ({"latent": latent, "sigma": sigma, "context_k": k, "context_v": v},
               {"velocity": rf(latent, sigma, k, v)})
    return {
        "text_encoder": ({"input_ids": ids, "input_lengths": lengths},
                         {"prompt_embedding_table": a, "draft_prompt_embedding_table": b}),
        "refiner_step": refiner, "refiner_step.plugin": refiner,
        "vae_decoder": ({"latent": z, "prev_latent": prev}, {"frames": vae(z, prev)}),
    }


def compare(checkpoint: Path, onnx_dir: Path, work: Path, trt: bool = False) -> dict[str, int]:
    from polygraphy.comparator import RunResults  # noqa: PLC0415
    from polygraphy.comparator.struct import IterationResult  # noqa: PLC0415
    from polygraphy.json import save_json  # noqa: PLC0415

    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or "polygraphy"
    work.mkdir(parents=True, exist_ok=True)
    codes = {}
    for name, (inputs, outputs) in references(checkpoint).items():
        runners = (["--trt"] if trt else []) + ([] if name.endswith(".plugin") else ["--onnxrt"])
        if not runners:
            continue
        feed = {k: v.numpy() for k, v in inputs.items()}
        save_json([feed], str(work / f"{name}.inputs.json"))
        result = IterationResult({k: v.numpy() for k, v in outputs.items()}, runner_name="pytorch")
        RunResults([("pytorch", [result])]).save(str(work / f"{name}.torch.json"))
        atol, rtol = TOLERANCE[name]
        cmd = [exe, "run", str(onnx_dir / f"{name}.onnx"), *runners,
               "--load-inputs", str(work / f"{name}.inputs.json"),
               "--load-outputs", str(work / f"{name}.torch.json"),
               "--atol", str(atol), "--rtol", str(rtol)]
        if name.endswith(".plugin"):
            codes[name] = _compare_plugin_graph_in_process(onnx_dir / f"{name}.onnx", feed,
                                                           outputs, atol, rtol)
            continue
        print(" ".join(cmd), flush=True)
        codes[name] = subprocess.call(cmd)
    return codes


def _compare_plugin_graph_in_process(path: Path, feed: dict, outputs: dict, atol, rtol) -> int:
    """TensorRT with the helios plugin registered in this process (TensorRT machines only)."""
    import numpy as np  # noqa: PLC0415
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork,  # noqa: PLC0415
                                        NetworkFromOnnxPath, Profile, TrtRunner)

    import helios.export.trt_context_attention as plugin  # noqa: PLC0415  registers helios::ContextAttention

    plugin.use_aot()  # the implementation the served engine embeds

    profile = Profile()
    for k, v in feed.items():
        profile.add(k, min=v.shape, opt=v.shape, max=v.shape)
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(path)),
                               config=CreateConfig(bf16=True, profiles=[profile]))
    with TrtRunner(engine) as runner:
        got = runner.infer(feed)
    ok = all(np.allclose(got[k], v.numpy(), atol=atol, rtol=rtol) for k, v in outputs.items())
    print(f"{path.name}: TensorRT with the plugin {'matches' if ok else 'differs from'} PyTorch")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("weights/helios-tiny"))
    ap.add_argument("--onnx", type=Path, default=Path("build-out/onnx"))
    ap.add_argument("--work", type=Path, default=Path("build-out/polygraphy"))
    ap.add_argument("--trt", action="store_true", help="also compare TensorRT (where it exists)")
    args = ap.parse_args(argv)
    codes = compare(args.checkpoint, args.onnx, args.work, args.trt)
    for name, code in codes.items():
        print(f"{name:<22} {'PASSED' if code == 0 else 'FAILED'}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""ONNX export of the stages that TensorRT builds as engines: text_encoder, one refiner
denoising step (two variants), vae_decoder.

    python -m helios.export.onnx_export --checkpoint weights/helios-tiny --out build-out/onnx

Writes, opset 17, tensor names of the Triton contract where the stage has one:
  text_encoder.onnx        input_ids INT32 [1, L], input_lengths INT32 [1]
                           -> prompt_embedding_table [1, L, H], draft_prompt_embedding_table
  refiner_step.onnx        latent [B, C, h, w], sigma [1], context_k / context_v
                           [layers, B, heads, Nc, head_dim] -> velocity [B, C, h, w]
                           (standard ops: attention as softmax over the concatenated K/V)
  refiner_step.plugin.onnx the same, each attention one helios::ContextAttention node
                           (attributes plugin_namespace "helios", plugin_version "1", scale),
                           which TensorRT maps to the plugin of trt_context_attention.py
  vae_decoder.onnx         latent, prev_latent [C, h, w] -> frames UINT8 [4, H, W, 3]
Dynamic axes: the prompt length L, the context length Nc, the refiner batch B.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn


from helios import attention
from helios.checkpoint import load_component, read_config

OPSET = 17


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, input_lengths):
        return self.text_encoder(input_ids.long(), input_lengths.long())


class RefinerStepGraph(nn.Module):
    """One denoising step over a precomputed context K/V (the engine runs it num_steps times)."""

    def __init__(self, refiner):
        super().__init__()
        self.refiner = refiner

    def forward(self, latent, sigma, context_k, context_v):
        kv = [(context_k[i], context_v[i]) for i in range(context_k.shape[0])]
        return self.refiner(latent, sigma, kv)


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, latent, prev_latent):
        frames = self.decoder(latent[None], prev_latent[None])[0]          # [4, 3, H, W]
        pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round()
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)                  # [4, H, W, 3]


def example_inputs(cfg, stage: str, context_len: int | None = None, prompt_len: int = 12,
                   batch: int = 1, seed: int = 0):
    """Random inputs of the right shapes and dtypes for one stage."""
    g = torch.Generator().manual_seed(seed)
    rf = cfg.refiner
    latent = (rf.latent_channels, cfg.latent_height, cfg.latent_width)
    if stage == "text_encoder":
        ids = torch.randint(0, 258, (1, prompt_len), generator=g, dtype=torch.int32)
        return ids, torch.tensor([prompt_len], dtype=torch.int32)
    if stage == "refiner_step":
        nc = context_len if context_len is not None else rf.plan_tokens_per_frame + 16
        kv = (rf.num_layers, batch, rf.num_heads, nc, rf.head_dim)
        return (torch.randn(batch, *latent, generator=g), torch.rand(1, generator=g),
                torch.randn(kv, generator=g), torch.randn(kv, generator=g))
    if stage == "vae_decoder":
        return torch.randn(latent, generator=g), torch.randn(latent, generator=g)
    raise ValueError(stage)


def export_stage(module: nn.Module, inputs, path: Path, input_names, output_names, dynamic_axes,
                 custom_domain: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), tuple(inputs), str(path), dynamo=False,
                          opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          custom_opsets={attention.ONNX_DOMAIN: 1} if custom_domain else None)
    return path


@torch.no_grad()
def export_all(checkpoint: Path, out: Path) -> dict[str, Path]:
    cfg = read_config(checkpoint)
    te = TextEncoderGraph(load_component(checkpoint, "text_encoder", cfg))
    refiner = RefinerStepGraph(load_component(checkpoint, "refiner", cfg))
    vae = VAEDecoderGraph(load_component(checkpoint, "vae", cfg))
    paths = {"text_encoder": export_stage(
        te, example_inputs(cfg, "text_encoder"), out / "text_encoder.onnx",
        ["input_ids", "input_lengths"], ["prompt_embedding_table", "draft_prompt_embedding_table"],
        {"input_ids": {1: "prompt_len"}, "prompt_embedding_table": {1: "prompt_len"},
         "draft_prompt_embedding_table": {1: "prompt_len"}})}
    refiner_axes = {"latent": {0: "batch"}, "context_k": {1: "batch", 3: "context_len"},
                    "context_v": {1: "batch", 3: "context_len"}, "velocity": {0: "batch"}}
    for name, custom in (("refiner_step", False), ("refiner_step.plugin", True)):
        attention.EXPORT_AS_CUSTOM_NODE = custom
        try:
            paths[name] = export_stage(
                refiner, example_inputs(cfg, "refiner_step"), out / f"{name}.onnx",
                ["latent", "sigma", "context_k", "context_v"], ["velocity"], refiner_axes,
                custom_domain=custom)
        finally:
            attention.EXPORT_AS_CUSTOM_NODE = False
    paths["vae_decoder"] = export_stage(
        vae, example_inputs(cfg, "vae_decoder"), out / "vae_decoder.onnx",
        ["latent", "prev_latent"], ["frames"], None)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("weights/helios-tiny"))
    ap.add_argument("--out", type=Path, default=Path("build-out/onnx"))
    args = ap.parse_args(argv)
    import onnx  # noqa: PLC0415

    for name, path in export_all(args.checkpoint, args.out).items():
        onnx.checker.check_model(str(path))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), onnx.checker passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

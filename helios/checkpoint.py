"""Checkpoints: one folder, one sub-folder per component with ``config.json`` and
``model.safetensors`` (the diffusers layout). ``ar_backbone/`` and ``draft/`` are plain
HuggingFace Llama checkpoints. ``model_index.json`` at the top names the configuration.

Loading checks every file, tensor name, shape and dtype and says exactly what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .ar_backbone import ARBackbone
from .config import (FORMAT_VERSION, ARConfig, HeliosConfig, RefinerConfig, TextEncoderConfig, VAEConfig,
                     check_config, get_config, read_config)
from .errors import HeliosError
from .refiner import Refiner
from .text_encoder import TextEncoder
from .vae import VAE

COMPONENTS = ("text_encoder", "ar_backbone", "draft", "refiner", "vae")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def component_config(cfg: HeliosConfig, name: str):
    return getattr(cfg, name)


def build_component(cfg: HeliosConfig, name: str, device="cpu"):
    """The module of one component, uninitialised (use device="meta" to allocate nothing)."""
    sub = component_config(cfg, name)
    cls = {"text_encoder": TextEncoder, "ar_backbone": ARBackbone, "draft": ARBackbone,
           "refiner": Refiner, "vae": VAE}[name]
    with torch.device(device):
        return cls(sub)


def _component_json(cfg: HeliosConfig, name: str) -> dict:
    sub = component_config(cfg, name)
    if isinstance(sub, ARConfig):
        return sub.to_hf_dict()
    d = dict(sub.__dict__)
    if isinstance(sub, VAEConfig):
        d["channels"] = list(d["channels"])
    return d


def _component_from_json(name: str, d: dict):
    if name in ("ar_backbone", "draft"):
        return ARConfig.from_hf_dict(d)
    cls = {"text_encoder": TextEncoderConfig, "refiner": RefinerConfig, "vae": VAEConfig}[name]
    return cls(**d)


def _state_dict(module) -> dict:
    sd = module.state_dict()
    if isinstance(module, ARBackbone) and module.config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # transformers re-ties it from embed_tokens
    return {k: v.contiguous() for k, v in sd.items()}


@torch.no_grad()
def random_component(cfg: HeliosConfig, name: str, device, dtype: torch.dtype, seed: int):
    """A component with random weights made directly on ``device`` in ``dtype`` (for the 14b
    config: seconds on a GPU instead of minutes of float32 on the CPU). Matrices are
    normal(0, 1/sqrt(fan_in)), which keeps activations O(1); norm weights 1, vectors 0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        module = build_component(cfg, name, device=device)
    finally:
        torch.set_default_dtype(old)
    for pname, p in module.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in pname else 0.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    return module.eval()


def random_components(cfg: HeliosConfig, device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Every component with random weights (``random_component``), by name."""
    return {name: random_component(cfg, name, device, dtype, seed * 1000 + i)
            for i, name in enumerate(COMPONENTS)}


def init_checkpoint(cfg: HeliosConfig | str, out: str | Path, seed: int = 0,
                    dtype: str = "float32", device: str = "cpu") -> Path:
    """Write a random-initialised checkpoint (deterministic by seed). On the CPU each
    component uses its own initialisation; with device="cuda" the fast generic one of
    ``random_component`` (same shapes, other numbers)."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    if dtype not in _DTYPES:
        raise HeliosError("dtype", f"must be one of {sorted(_DTYPES)}, got {dtype!r}")
    check_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(COMPONENTS):
        if device == "cpu":
            module = build_component(cfg, name)
            module.init_weights(torch.Generator().manual_seed(seed * 1000 + i))
            module = module.to(_DTYPES[dtype])
        else:
            module = random_component(cfg, name, device, _DTYPES[dtype], seed * 1000 + i).cpu()
        save_component(module, cfg, name, out)
        del module
    write_index(cfg, out)
    return out


def save_component(module, cfg: HeliosConfig, name: str, out: Path) -> None:
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_component_json(cfg, name), indent=2) + "\n")
    save_file(_state_dict(module), str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_index(cfg: HeliosConfig, out: Path) -> None:
    index = {"_class_name": "HeliosPipeline", "format_version": FORMAT_VERSION,
             "config": cfg.to_dict(), "components": list(COMPONENTS)}
    (Path(out) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_component(path: str | Path, name: str, cfg: HeliosConfig | None = None,
                   device="cpu", dtype: torch.dtype | None = None):
    """Load one component, checking its config, every tensor name, shape and dtype."""
    path = Path(path)
    cfg = cfg or read_config(path)
    folder = path / name
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise HeliosError("checkpoint", f"{name}: missing file {f}")
    try:
        sub = _component_from_json(name, json.loads(cfg_file.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise HeliosError("checkpoint", f"{name}: {cfg_file} is not a valid config: {e}") from None
    if sub != component_config(cfg, name):
        raise HeliosError("checkpoint", f"{name}: {cfg_file} does not match model_index.json")
    module = build_component(cfg, name, device="meta")
    expected = {k: v for k, v in module.state_dict().items()}
    if isinstance(module, ARBackbone) and sub.tie_word_embeddings:
        expected.pop("lm_head.weight")
    try:
        f = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise HeliosError("checkpoint", f"{name}: cannot read {weights}: {e}") from None
    keys = set(f.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing:
        raise HeliosError("checkpoint", f"{name}: missing tensor {missing[0]!r} in {weights}"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise HeliosError("checkpoint", f"{name}: unexpected tensor {unexpected[0]!r} in {weights}")
    dtypes = {}
    for k in sorted(keys):
        sl = f.get_slice(k)
        shape = tuple(sl.get_shape())
        if shape != tuple(expected[k].shape):
            raise HeliosError("checkpoint", f"{name}: tensor {k!r} has shape {list(shape)}, "
                                            f"expected {list(expected[k].shape)}")
        dtypes[k] = sl.get_dtype()
    counts = {}
    for dt in dtypes.values():
        counts[dt] = counts.get(dt, 0) + 1
    stored_dtype = max(counts, key=counts.get)
    for k, dt in dtypes.items():
        if dt != stored_dtype:
            raise HeliosError("checkpoint", f"{name}: tensor {k!r} is {dt}, the others are {stored_dtype}")
    if stored_dtype not in ("F32", "BF16", "F16"):
        raise HeliosError("checkpoint", f"{name}: dtype must be F32, BF16 or F16, got {stored_dtype}")
    # Each tensor is read once into its own memory on the device, in the dtype asked for, and
    # becomes the parameter (``assign``) of the module built on the meta device above.
    # Building the module on the CPU first allocated and randomly initialised a float32 copy
    # of every weight only to overwrite it: the 14b refiner loaded in 16.7-19.6 s at a peak of
    # 9.0 GiB on a 2-core CPU, now in 1.0-1.2 s at 6.1 GiB. A copy, never a view of the file:
    # a training run may write the file while the module lives.
    target = dtype or torch.get_default_dtype()
    state = {k: f.get_tensor(k).to(device=device, dtype=target, copy=True) for k in keys}
    tied = isinstance(module, ARBackbone) and sub.tie_word_embeddings
    module.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.eval()


def count_parameters(cfg: HeliosConfig) -> dict[str, int]:
    """Parameters per component, computed on the meta device (nothing is allocated)."""
    out = {}
    for name in COMPONENTS:
        module = build_component(cfg, name, device="meta")
        if name == "vae":
            out["vae_encoder"] = sum(p.numel() for p in module.encoder.parameters())
            out["vae_decoder"] = sum(p.numel() for p in module.decoder.parameters())
        else:
            out[name] = sum(p.numel() for p in module.parameters())
    return out

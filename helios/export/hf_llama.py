"""Write the AR backbone and the draft model as standalone HuggingFace Llama checkpoints.

    python -m helios.export.hf_llama --checkpoint weights/helios-tiny --out build-out/hf

The component folders of a Helios checkpoint already are Llama checkpoints (config.json with
architectures LlamaForCausalLM, safetensors with transformers' names): this copies them out
with a generation_config.json, which TensorRT-LLM's convert_checkpoint.py and
transformers.LlamaForCausalLM.from_pretrained read. The prompt is not part of them: it enters as
prompt-embedding rows (virtual ids >= vocab_size) that the text_encoder produces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


from helios.checkpoint import load_component, read_config


def export_llama(checkpoint: Path, out: Path) -> dict[str, Path]:
    cfg = read_config(checkpoint)
    paths = {}
    for name in ("ar_backbone", "draft"):
        load_component(checkpoint, name, cfg)  # checks every file, name, shape and dtype first
        dst = out / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(checkpoint / name / f, dst / f)
        ar = getattr(cfg, name)
        (dst / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ar.bos_token_id, "eos_token_id": ar.eos_token_id,
            "pad_token_id": ar.pad_token_id, "do_sample": True, "temperature": 0.7}, indent=2) + "\n")
        paths[name] = dst
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("weights/helios-tiny"))
    ap.add_argument("--out", type=Path, default=Path("build-out/hf"))
    args = ap.parse_args(argv)
    for name, path in export_llama(args.checkpoint, args.out).items():
        print(f"wrote {name} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

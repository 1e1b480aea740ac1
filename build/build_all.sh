#!/usr/bin/env bash
# Every production engine of one checkpoint, then the TensorRT flavour of the model repository:
#   bash build/build_all.sh CHECKPOINT ENGINE_DIR REPOSITORY [MAX_STREAMS]
# ONNX (helios/export/onnx_export.py) -> TensorRT plans with the helios::ContextAttention plugin
# compiled in (build/build_engines.py), HuggingFace Llama folders (helios/export/hf_llama.py) ->
# TensorRT-LLM engines of the AR backbone and the draft (build/build_trtllm.sh), then
# helios_triton/fill_repository.py --flavour tensorrt. Engines are tied to the GPU and TensorRT version
# they were built with, so ENGINE_DIR carries a stamp of both and is rebuilt when it differs.
# Verified where: the ONNX and HF exports and the fill step run in `make test` on the CPU; the
# TensorRT and TensorRT-LLM builds have not run (no TensorRT on the development machines).
set -euo pipefail
ckpt="${1:?CHECKPOINT}"; engines="${2:?ENGINE_DIR}"; repo="${3:?REPOSITORY}"; streams="${4:-4}"
root="$(cd "$(dirname "$0")/.." && pwd)"
stamp="$(python3 -c 'import tensorrt, torch; print(tensorrt.__version__, torch.cuda.get_device_name(0))')"
stamp="$stamp $(sha256sum "$ckpt"/*/model.safetensors | sha256sum | cut -c1-16)"
if [ "$(cat "$engines/STAMP" 2>/dev/null)" != "$stamp" ]; then
    echo "helios: building engines into $engines ($stamp)" >&2
    work="$(mktemp -d)"
    python3 -m helios.export.onnx_export --checkpoint "$ckpt" --out "$work/onnx"
    python3 -m helios.export.hf_llama --checkpoint "$ckpt" --out "$work/hf"
    mkdir -p "$engines"
    python3 "$root/build/build_engines.py" --checkpoint "$ckpt" --onnx "$work/onnx" \
        --out "$engines" --max-streams "$streams" --timing-cache "$engines/timing.cache"
    bash "$root/build/build_trtllm.sh" "$work/hf" "$engines" "$streams"
    rm -rf "$work"
    echo "$stamp" > "$engines/STAMP"
fi
python3 -m helios_triton.fill_repository --flavour tensorrt --checkpoint "$ckpt" \
    --templates "$root/model_repository" \
    --engine-dir "$engines" --device cuda --max-streams "$streams" --out "$repo"

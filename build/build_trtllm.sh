#!/usr/bin/env bash
# TensorRT-LLM engines of the AR backbone and the draft model, from the HuggingFace Llama
# checkpoints that helios/export/hf_llama.py writes. Run inside NVIDIA's Triton TensorRT-LLM image.
#   bash build/build_trtllm.sh HF_DIR ENGINE_DIR [MAX_BATCH] [MAX_PROMPT_ROWS]
# - paged KV cache and packed (padding-free) inputs: what in-flight batching needs;
# - --max_prompt_embedding_table_size: the prompt enters as p-tuning rows (virtual ids >= vocab);
# - the target accepts external draft tokens (draft-target speculative decoding).
# Verified where: written against trtllm-build's documented options; not run here.
set -euo pipefail
hf="${1:?HF_DIR}"; out="${2:?ENGINE_DIR}"; batch="${3:-8}"; rows="${4:-514}"
examples="${TRTLLM_EXAMPLES:-/app/tensorrt_llm/examples}"
work="$(mktemp -d)"
for model in ar_backbone draft; do
    python3 "$examples/llama/convert_checkpoint.py" --model_dir "$hf/$model" \
        --output_dir "$work/$model" --dtype bfloat16
    extra=()
    if [ "$model" = ar_backbone ]; then
        extra=(--speculative_decoding_mode draft_tokens_external --max_draft_len 4)
    fi
    trtllm-build --checkpoint_dir "$work/$model" --output_dir "$out/$model" \
        --gemm_plugin auto --gpt_attention_plugin auto \
        --paged_kv_cache enable --remove_input_padding enable --use_paged_context_fmha enable \
        --max_batch_size "$batch" --max_input_len 1024 --max_seq_len 1280 \
        --max_prompt_embedding_table_size $((rows * batch)) "${extra[@]}"
done
rm -rf "$work"

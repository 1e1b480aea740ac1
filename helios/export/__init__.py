"""Export of the stages for the production runtimes: ONNX graphs for TensorRT
(``onnx_export``), their comparison against PyTorch with polygraphy (``compare``), the AR
backbone and draft as HuggingFace Llama checkpoints for TensorRT-LLM (``hf_llama``), and the
TensorRT plugin registration of the custom attention (``trt_context_attention``). Each module
runs as ``python -m helios.export.NAME``; the core package never imports this one."""

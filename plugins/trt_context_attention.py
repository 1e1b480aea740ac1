"""TensorRT registration of the custom attention (TensorRT >= 10.7 quickly deployable plugins).

Importing this module registers ``helios::ContextAttention``, the op that the refiner's ONNX
graph carries (export/onnx_export.py: op_type ContextAttention, attributes plugin_namespace
"helios", plugin_version "1", scale); TensorRT's ONNX parser then builds that node as this
plugin. The implementation calls the same Triton-lang kernel as the PyTorch runtime.

Verified where: the kernel is tested on an H100 (tests/test_context_attention_kernel.py); this
registration is written against the tensorrt.plugin API and has not run (TensorRT's builder
cannot be installed on the development machines).
"""

from typing import Tuple

import tensorrt.plugin as trtp
import torch

from plugins.context_attention import context_attention

PLUGIN_ID = "helios::ContextAttention"


@trtp.register(PLUGIN_ID)
def context_attention_desc(q: trtp.TensorDesc, k_ctx: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                           k_self: trtp.TensorDesc, v_self: trtp.TensorDesc,
                           scale: float) -> trtp.TensorDesc:
    """The output has the shape and dtype of the queries."""
    return q.like()


@trtp.impl(PLUGIN_ID)
def context_attention_impl(q: trtp.Tensor, k_ctx: trtp.Tensor, v_ctx: trtp.Tensor,
                           k_self: trtp.Tensor, v_self: trtp.Tensor, scale: float,
                           outputs: Tuple[trtp.Tensor], stream: int) -> None:
    # trtp.Tensor exposes __cuda_array_interface__: torch views it without a copy.
    as_torch = lambda t: torch.as_tensor(t, device="cuda")  # noqa: E731
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        context_attention(as_torch(q), as_torch(k_ctx), as_torch(v_ctx), as_torch(k_self),
                          as_torch(v_self), scale, out=as_torch(outputs[0]))

"""TensorRT registration of the custom attention (TensorRT >= 10.8 quickly deployable plugins).

Importing this module registers ``helios::ContextAttention`` (version 1), the op that the
refiner's ONNX graph carries (helios/export/onnx_export.py: op_type ContextAttention, attributes
plugin_namespace "helios", plugin_version "1", scale); TensorRT's ONNX parser then builds that
node as this plugin. Two implementations of the same Triton-lang kernel exist:

- ahead of time (``use_aot``, the default of build/build_engines.py): at engine build time
  the kernel ``context_attention_aot_kernel`` is compiled to PTX, which TensorRT embeds in
  the plan with symbolic launch parameters. The engine then runs in Triton's C++
  ``tensorrt_plan`` backend with no Python. TensorRT launches the kernel with its inputs,
  then the extra scalars returned here, then its output, which is why that kernel takes
  (Q, KC, VC, KS, VS, NQ, NC, NS, O) and has the heads, scale and tile as constants.
- just in time (``use_jit``): TensorRT calls back into Python, which launches the autotuned
  kernel through PyTorch. Handy with polygraphy in a Python process; not servable by the C++
  backend.

Verified where: the kernels (both entry points) are tested on an H100 against the PyTorch
reference, and the AOT kernel's PTX is produced there by ``triton.compile`` with the same
source and options as below (tests/test_context_attention_kernel.py). This registration has
not run: TensorRT's builder cannot be installed on the development machines.
"""

from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

PLUGIN_ID = "helios::ContextAttention"
_DTYPES = {trt.bfloat16: "bf16", trt.float16: "fp16", trt.float32: "fp32"}


@trtp.register(PLUGIN_ID)
def context_attention_desc(q: trtp.TensorDesc, k_ctx: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                           k_self: trtp.TensorDesc, v_self: trtp.TensorDesc,
                           scale: float) -> trtp.TensorDesc:
    """The output has the shape and dtype of the queries."""
    return q.like()


def use_aot() -> None:
    """Register the ahead-of-time implementation (for engines served by the C++ backend)."""

    @trtp.aot_impl(PLUGIN_ID)
    def context_attention_aot(q: trtp.TensorDesc, k_ctx: trtp.TensorDesc,
                              v_ctx: trtp.TensorDesc, k_self: trtp.TensorDesc,
                              v_self: trtp.TensorDesc, scale: float,
                              outputs: Tuple[trtp.TensorDesc], tactic: int
                              ) -> Tuple[Union[str, bytes], Union[str, bytes],
                                         trtp.KernelLaunchParams, trtp.SymExprs]:
        from helios.kernels.context_attention import AOT_BLOCK_M, compile_aot  # noqa: PLC0415

        if q.dtype not in _DTYPES:
            raise ValueError(f"helios::ContextAttention supports bf16, fp16 and fp32, got {q.dtype}")
        # Heads and head size are fixed by the refiner's weights: static in every profile.
        heads, head_dim = q.shape_expr[1], q.shape_expr[3]
        if not (heads.is_constant and head_dim.is_constant):
            raise ValueError("helios::ContextAttention needs static heads and head dim")
        compiled, name = compile_aot(_DTYPES[q.dtype], heads.constant_value(),
                                     head_dim.constant_value(), scale)
        nq, nc, ns = q.shape_expr[2], k_ctx.shape_expr[2], k_self.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(nq, AOT_BLOCK_M)
        launch.grid_y = q.shape_expr[0] * heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs(3)
        extra[0], extra[1], extra[2] = trtp.SymInt32(nq), trtp.SymInt32(nc), trtp.SymInt32(ns)
        return name, compiled.asm["ptx"], launch, extra


def use_jit() -> None:
    """Register the Python-callback implementation (polygraphy and tests in one process)."""
    import torch  # noqa: PLC0415

    from helios.kernels.context_attention import context_attention  # noqa: PLC0415

    @trtp.impl(PLUGIN_ID)
    def context_attention_impl(q: trtp.Tensor, k_ctx: trtp.Tensor, v_ctx: trtp.Tensor,
                               k_self: trtp.Tensor, v_self: trtp.Tensor, scale: float,
                               outputs: Tuple[trtp.Tensor], stream: int) -> None:
        # trtp.Tensor exposes __cuda_array_interface__: torch views it without a copy.
        as_torch = lambda t: torch.as_tensor(t, device="cuda")  # noqa: E731
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            context_attention(as_torch(q), as_torch(k_ctx), as_torch(v_ctx), as_torch(k_self),
                              as_torch(v_self), scale, out=as_torch(outputs[0]))

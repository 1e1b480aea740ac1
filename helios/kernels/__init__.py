"""GPU kernels of the package, each importable on its own.

``context_attention`` is the refiner's custom attention as a Triton-lang kernel. It imports
nothing else of ``helios`` because the TensorRT plugin registration
(``helios/export/trt_context_attention.py``) loads it alone, inside TensorRT's engine builder.
``gemv`` is the AR decode step's one-row bf16 product (``helios::gemv`` in ``ar_backbone``).
"""

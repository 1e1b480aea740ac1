"""cuBLASLt's candidate algorithms for a product, each callable, for benchmarks/refiner_gemms.py.

PyTorch calls cuBLASLt for a product with a bias (``F.linear``) and runs the first algorithm
that cuBLASLt's heuristic ranks for the shape. The heuristic ranks several. This module
reaches the library through ``ctypes`` (the same ``libcublasLt`` that torch loaded): it asks
the heuristic for its candidates for ``y = x W^T + b`` (optionally with the tanh GELU in the
epilogue) and runs any of them, so that a benchmark can time each against the pick.

Layout: torch's row-major ``x`` [M, K], ``W`` [N, K] and ``y`` [M, N] are cuBLAS's
column-major ``x^T`` [K, M], ``W^T`` [K, N] and ``y^T`` [N, M], so the product is
``y^T = op_T(W^T) x^T``: A = W transposed, B = x, D = y, the bias along D's rows (N).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

# cuBLAS / cuBLASLt enums (cublasLt.h, library_types.h)
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE = 3, 4, 7
_DESC_BIAS_POINTER, _DESC_BIAS_DATA_TYPE = 8, 26
_OP_N, _OP_T = 0, 1
_EPILOGUE_BIAS, _EPILOGUE_GELU_BIAS = 4, 36
_PREF_MAX_WORKSPACE_BYTES = 1
_ALGO_CONFIG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5,
                "stages": 6, "inner_shape": 7, "cluster_shape": 8}
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}
WORKSPACE_BYTES = 32 << 20


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib_state: dict = {}
_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    """The ``libcublasLt`` this process loaded with torch (found in /proc/self/maps), else the
    first of its usual names that loads."""
    if "lib" not in _lib_state:
        torch.empty(1, device="cuda") @ torch.empty(1, 1, device="cuda")[0]  # load cuBLAS
        paths = []
        try:
            with open("/proc/self/maps") as maps:
                paths = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
        except OSError:
            pass
        lib = None
        for name in paths + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise RuntimeError("cuBLASLt: libcublasLt is not loaded and does not load")
        for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
                   "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate",
                   "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulAlgoGetHeuristic",
                   "cublasLtMatmul", "cublasLtMatmulAlgoConfigGetAttribute"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                                   ctypes.c_uint64, ctypes.c_uint64,
                                                   ctypes.c_int64]
        handle = ctypes.c_void_p()
        _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _lib_state.update(lib=lib, handle=handle)
    return _lib_state["lib"]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt: {what} returned status {status}")


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


@dataclass(frozen=True)
class Candidate:
    """One of the heuristic's algorithms for a product: its rank, the workspace it needs,
    cuBLASLt's estimate of its waves and its configuration (tile, stages, ... ids)."""
    rank: int
    algo: _Algo
    workspace: int
    waves: float
    config: dict


class Product:
    """``y = x W^T + b`` (``gelu``: then the tanh GELU) for x [rows, k], W [n, k], b [n] of
    one 16-bit dtype on the current CUDA device, through cuBLASLt. Not thread-safe for
    concurrent calls of one Product: the bias pointer is an attribute of its descriptor."""

    def __init__(self, rows: int, k: int, n: int, dtype: torch.dtype, gelu: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"cuBLASLt product: dtype must be bfloat16 or float16, got {dtype}")
        lib = _library()
        self.shape, self.dtype, self.gelu = (rows, k, n), dtype, gelu
        t = _DTYPES[dtype]
        self._desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self._desc), _COMPUTE_32F, _R_32F),
               "cublasLtMatmulDescCreate")
        setter = lib.cublasLtMatmulDescSetAttribute
        _set(setter, self._desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        _set(setter, self._desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        _set(setter, self._desc, _DESC_EPILOGUE,
             ctypes.c_uint32(_EPILOGUE_GELU_BIAS if gelu else _EPILOGUE_BIAS))
        _set(setter, self._desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(t))
        self._a, self._b, self._d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, (r, c) in ((self._a, (k, n)), (self._b, (k, rows)), (self._d, (n, rows))):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), t, r, c, r),
                   "cublasLtMatrixLayoutCreate")
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def candidates(self, count: int = 32) -> list[Candidate]:
        """The heuristic's algorithms for this product, its first pick first."""
        lib = _library()
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(WORKSPACE_BYTES))
        results = (_Heuristic * count)()
        returned = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(
            _lib_state["handle"], self._desc, self._a, self._b, self._d, self._d, pref, count,
            results, ctypes.byref(returned)), "cublasLtMatmulAlgoGetHeuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        out = []
        for i in range(returned.value):
            r = results[i]
            if r.state != 0:
                continue
            algo = _Algo()
            ctypes.memmove(ctypes.byref(algo), ctypes.byref(r.algo), ctypes.sizeof(_Algo))
            out.append(Candidate(i, algo, int(r.workspace_size), float(r.waves),
                                 _config(lib, algo)))
        return out

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 candidate: Candidate, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, k, n = self.shape
        if (tuple(x.shape) != (rows, k) or tuple(w.shape) != (n, k) or tuple(b.shape) != (n,)
                or not (x.is_contiguous() and w.is_contiguous() and b.is_contiguous())):
            raise ValueError(f"cuBLASLt product {self.shape}: x {tuple(x.shape)}, "
                             f"w {tuple(w.shape)}, b {tuple(b.shape)}, each contiguous")
        out = x.new_empty(rows, n) if out is None else out
        work = x.new_empty(max(candidate.workspace, 1), dtype=torch.uint8)
        lib = _library()
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        with _lock:
            _set(lib.cublasLtMatmulDescSetAttribute, self._desc, _DESC_BIAS_POINTER,
                 ctypes.c_void_p(b.data_ptr()))
            _check(lib.cublasLtMatmul(
                _lib_state["handle"], self._desc, ctypes.byref(self._alpha),
                ctypes.c_void_p(w.data_ptr()), self._a, ctypes.c_void_p(x.data_ptr()), self._b,
                ctypes.byref(self._beta), ctypes.c_void_p(out.data_ptr()), self._d,
                ctypes.c_void_p(out.data_ptr()), self._d, ctypes.byref(candidate.algo),
                ctypes.c_void_p(work.data_ptr()), ctypes.c_size_t(candidate.workspace), stream),
                "cublasLtMatmul")
        return out


def _config(lib, algo: _Algo) -> dict:
    out = {}
    for name, attr in _ALGO_CONFIG.items():
        value, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
        status = lib.cublasLtMatmulAlgoConfigGetAttribute(
            ctypes.byref(algo), attr, ctypes.byref(value), ctypes.sizeof(value),
            ctypes.byref(written))
        if status == 0:
            out[name] = int(value.value)
    return out

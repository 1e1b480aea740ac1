"""On a GPU: the one-row bf16 product of the AR's decode step (``helios::gemv``, the Triton-lang
kernel of helios/kernels/gemv.py) against a float32 reference at the tiles and shapes it
meets (the compiled, captured step that runs it: tests/test_cuda_graphs.py). Skips without
CUDA."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n,k", [(5120, 5120), (1024, 5120), (5120, 13824), (27648, 5120),
                                 (100, 300), (7, 1000)])
@pytest.mark.parametrize("tile", [None, {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4},
                                  {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 8}])
def test_one_row_product_matches_float32(n, k, tile):
    from helios.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * 0.02).cuda().to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen).cuda().to(torch.bfloat16)
    got = gemv(x, w, tile).float()
    ref = F.linear(x.float(), w.float())
    assert got.shape == (1, n)
    # One bf16 rounding of the output: float32 sums either way.
    assert (got - ref).abs().max() <= 2 ** -7 * ref.abs().max() + 1e-4

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


@pytest.mark.parametrize("n,k", [(7168, 5120), (5120, 13824), (100, 300)])
@pytest.mark.parametrize("folded", ["norm", "gate", "residual", "gate norm residual"])
def test_the_work_folded_into_the_product_matches_the_modules(n, k, folded):
    """RMSNorm before the product, the MLP's gate, the residual after: the kernel against the
    model's own modules (``RMSNorm``, ``F.silu``) in float32 where they are, bf16 between."""
    from helios.ar_backbone import RMSNorm
    from helios.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=gen) * 0.02).cuda().to(torch.bfloat16)
    x, up = (torch.randn(2, k, generator=gen) * 3).cuda().to(torch.bfloat16).chunk(2)
    norm = RMSNorm(k, 1e-5).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(k, generator=gen))
    residual = torch.randn(1, n, generator=gen).cuda().to(torch.bfloat16)
    on = folded.split()
    h = (F.silu(x.float()) * up.float()).to(torch.bfloat16) if "gate" in on else x
    with torch.no_grad():
        ref = F.linear((norm(h) if "norm" in on else h).float(), w.float())
    ref = ref + residual.float() if "residual" in on else ref
    got = gemv(x, w, up=up if "gate" in on else None, norm=norm.weight if "norm" in on else None,
               eps=norm.eps, residual=residual if "residual" in on else None).float()
    # The reference rounds the normalised input to bf16 and the kernel does not: within a
    # few bf16 steps of the output's largest value.
    assert (got - ref).abs().max() <= 2 ** -6 * ref.abs().max() + 1e-3

"""On a GPU: the one-row bf16 product of the AR's decode step (``helios::gemv``, the Triton-lang
kernel of helios/kernels/gemv.py) against a float32 reference at the tiles and shapes it
meets, and the compiled, captured decode step that runs it against the eager one with
cuBLAS. Skips without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from helios import ar_backbone
from helios.ar_runtime import ARRuntime
from helios.config import get_config
from helios.sampling import SamplingParams
from helios.schedule import plan_vocab_bias

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


@pytest.fixture
def gemv_on():
    was = ar_backbone._GEMV["on"]
    ar_backbone.use_gemv(True)
    yield
    ar_backbone.use_gemv(was)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_captured_step_with_the_gemv_matches_eager_cublas(batch, gemv_on):
    cfg = get_config("tiny").ar_backbone
    dev = torch.device("cuda")
    model = ar_backbone.ARBackbone(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(dev, torch.bfloat16).eval()
    graph = ARRuntime(model, num_blocks=64, block_size=16, device=dev, cuda_graphs=True,
                      max_positions=256, compile_steps=True)
    eager = ARRuntime(model, num_blocks=64, block_size=16, device=dev, static_decode=False)
    ids = list(range(batch))
    for rt in (graph, eager):
        for i in ids:
            prefix = torch.randn(5 + 7 * i, cfg.hidden_size,
                                 generator=torch.Generator().manual_seed(i))
            rt.add_sequence(i, prefix, [cfg.bos_token_id], SamplingParams(seed=i),
                            bias=plan_vocab_bias(cfg))
    calls = []
    real = ar_backbone._gemv
    ar_backbone._gemv = lambda x, w: calls.append(x.shape) or real(x, w)
    try:
        with torch.no_grad():
            for step in range(20):
                ar_backbone.use_gemv(True)
                g = (torch.stack([graph.logits(i) for i in ids]) if step == 0
                     else graph._static_step(ids).clone())
                ar_backbone.use_gemv(False)  # the reference: cuBLAS
                e = torch.stack([eager.logits(i) for i in ids])
                rel = ((g - e).norm() / e.norm()).item()
                assert rel < 2e-2, (step, rel)
                for i, tok in zip(ids, e.argmax(-1).tolist()):
                    graph.seqs[i].tokens.append(tok % cfg.plan_vocab_size)
                    eager.seqs[i].tokens.append(tok % cfg.plan_vocab_size)
    finally:
        ar_backbone._gemv = real
    assert graph._static[batch].compiled
    # One row per step: the kernel was traced into the step; several rows: never.
    assert bool(calls) == (batch == 1)

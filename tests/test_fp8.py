"""FP8 AR weights (helios/fp8.py): per-channel e4m3 quantization, the reference path on any
device, the Triton GEMV kernel on a GPU against the same dequantized weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helios.ar_backbone import ARBackbone
from helios.ar_runtime import ARRuntime
from helios.config import get_config
from helios.fp8 import E4M3_MAX, FP8Linear, fp8_gemv, quantize_ar, quantize_weight
from helios.sampling import SamplingParams


def test_quantized_weight_uses_the_range_and_rounds_to_three_mantissa_bits():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert torch.allclose(q.float().abs().amax(1), torch.full((64,), E4M3_MAX))
    back = q.float() * s[:, None]
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value (normals), and values far
    # below the row's maximum fall into the subnormals, whose step is 2^-9 of the scale unit.
    bound = torch.maximum(w.abs() / 16, s[:, None] * 2.0 ** -10)
    assert ((back - w).abs() <= bound * 1.0001).all()


def test_fp8_linear_reference_path_and_quantize_ar():
    cfg = get_config("tiny").ar_backbone
    model = ARBackbone(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    rt = ARRuntime(model, num_blocks=16, block_size=16)
    prefix = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.02
    rt.add_sequence(0, prefix, [1, 2, 3], SamplingParams())
    ref = rt.logits(0)
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, lin.in_features)
    fp8 = FP8Linear(lin)
    assert torch.equal(fp8(x), F.linear(x, fp8.dequantized(x.dtype)))

    saved = quantize_ar(model)
    per_layer = [m for m in model.model.layers[0].modules() if isinstance(m, FP8Linear)]
    assert len(per_layer) == 7 and not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert isinstance(model.lm_head, nn.Linear)
    n = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
            if isinstance(m, FP8Linear))
    assert saved == n * 3 - 4 * sum(m.out_features for layer in model.model.layers
                                    for m in layer.modules() if isinstance(m, FP8Linear))
    rt = ARRuntime(model, num_blocks=16, block_size=16)
    rt.add_sequence(0, prefix, [1, 2, 3], SamplingParams())
    out = rt.logits(0)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.2, rel  # changed (the weights are FP8) but close


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,n,k", [(1, 5120, 5120), (3, 1024, 5120), (16, 13824, 5120),
                                   (2, 1000, 520), (4, 5120, 13824), (5, 64, 256)])
def test_fp8_gemv_kernel_matches_the_dequantized_matmul(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
    x = torch.randn(m, k, generator=g).cuda().bfloat16()
    w, s = w.cuda(), s.cuda()
    ref = x.float() @ (w.float() * s[:, None]).t()
    out = fp8_gemv(x, w, s)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel

"""FP8 weights (helios/fp8.py): per-channel e4m3 quantization; the AR's reference path on any
device and its Triton GEMV kernel on a GPU against the same dequantized weights; the
refiner's FP8 matmuls (row-wise activation scales) against the product of the quantized
values and against the unquantized refiner, eager on the CPU, compiled and captured on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helios.ar_backbone import ARBackbone
from helios.ar_runtime import ARRuntime
from helios.config import get_config
from helios.checkpoint import random_component
from helios.fp8 import (E4M3_MAX, FP8Linear, FP8MatmulLinear, fp8_gemv, quantize_ar,
                        quantize_refiner, quantize_weight)
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
    assert len(per_layer) == 4 and not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
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
                                   (2, 1000, 520), (4, 5120, 13824), (5, 64, 256),
                                   (96, 7168, 5120), (200, 1000, 520)])
def test_fp8_gemv_kernel_matches_the_dequantized_matmul(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
    x = torch.randn(m, k, generator=g).cuda().bfloat16()
    w, s = w.cuda(), s.cuda()
    ref = x.float() @ (w.float() * s[:, None]).t()
    # The default split of K, one slice, and three; for one row the tensor-core kernel too.
    for splits, fma in ((None, None), (1, None), (3, None), (2, False)):
        out = fp8_gemv(x, w, s, splits, fma)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (splits, fma, rel)


def _fp8_linear_case(device, dtype):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 384).to(device, dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(384, generator=g))
    # Rows of very different sizes: each must keep its own scale.
    x = (torch.randn(3, 37, 256, generator=g) * torch.logspace(-2, 2, 37)[None, :, None])
    return lin, x.to(device, dtype)


def test_fp8_matmul_linear_is_the_product_of_the_quantized_rows_and_weight():
    lin, x = _fp8_linear_case("cpu", torch.float32)
    fp8 = FP8MatmulLinear(lin)
    out = fp8(x)
    assert out.shape == (3, 37, 384) and out.dtype == x.dtype
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.scale.shape == (1, 384)
    rows = x.reshape(-1, 256)
    sx = rows.abs().amax(-1, keepdim=True) / E4M3_MAX
    xq = (rows / sx).to(torch.float8_e4m3fn).float() * sx
    wq = fp8.weight.float() * fp8.scale.t()
    want = (xq @ wq.t() + lin.bias).view(3, 37, 384)
    assert torch.allclose(out, want, rtol=1e-2, atol=1e-4 * want.abs().amax().item())
    # against the unquantized layer: close, row by row, whatever the row's magnitude
    ref = lin(x).detach()
    rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 0.08, rel.max()


def test_fp8_refiner_renders_close_to_the_unquantized_one(tiny_config):
    cfg = tiny_config
    rf = random_component(cfg, "refiner", torch.device("cpu"), torch.float32, 3)
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(shape, generator=g) for _ in range(4)]
    plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.plan_tokens_per_frame), generator=g)
    ref = rf.render(z[0], plan, z[1], z[2:])
    n = sum(b.qkv.weight.numel() + b.proj.weight.numel() + b.fc1.weight.numel()
            + b.fc2.weight.numel() for b in rf.blocks)
    scales = sum(b.qkv.out_features + b.proj.out_features + b.fc1.out_features
                 + b.fc2.out_features for b in rf.blocks)
    assert quantize_refiner(rf) == 3 * n - 4 * scales
    assert all(isinstance(getattr(b, k), FP8MatmulLinear) for b in rf.blocks
               for k in ("qkv", "proj", "fc1", "fc2"))
    assert all(isinstance(b.modulation, nn.Linear) for b in rf.blocks)
    out = rf.render(z[0], plan, z[1], z[2:])
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # changed (FP8 matmuls) but close


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_refiner_compiled_and_captured_on_the_gpu(tiny_config):
    """On the GPU (FP8 tensor cores, fast accumulation): the layer against the product of
    its quantized values; the compiled, graph-captured FP8 refiner against the eager FP8 one
    and against bf16, for every context length a stream goes through."""
    lin, x = _fp8_linear_case("cuda", torch.bfloat16)
    fp8 = FP8MatmulLinear(lin)
    rows = x.float().reshape(-1, 256)
    sx = rows.abs().amax(-1, keepdim=True) / E4M3_MAX
    want = ((rows / sx).to(torch.float8_e4m3fn).float() * sx) @ (fp8.weight.float() * fp8.scale.t()).t()
    want = want + lin.bias.float()
    got = fp8(x).float().reshape(-1, 384)
    assert ((got - want).norm() / want.norm()).item() < 1e-2

    cfg = tiny_config
    dev = torch.device("cuda")
    bf16 = random_component(cfg, "refiner", dev, torch.bfloat16, 3)
    rf = random_component(cfg, "refiner", dev, torch.bfloat16, 3)
    quantize_refiner(rf)
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(4)]
    plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.plan_tokens_per_frame), generator=g).to(dev)
    cases = [(None, []), (z[1], []), (z[1], [z[2]]), (z[1], [z[2], z[3]])]
    eager = [rf.render(z[0], plan, a, h) for a, h in cases]
    reference = [bf16.render(z[0], plan, a, h) for a, h in cases]
    rf.compile_steps()
    rf.capture_renders()
    for (a, h), e, r in zip(cases, eager, reference):
        out = rf.render(z[0], plan, a, h).float()
        assert ((out - e.float()).norm() / e.float().norm()).item() < 2e-2
        assert ((out - r.float()).norm() / r.float().norm()).item() < 0.1
    assert rf._compiled_step.compiled and len(rf._render_graphs) == len(cases)

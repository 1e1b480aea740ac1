"""On a GPU: the refiner blocks' gated residual add with the layer norm and modulation after it
(helios/kernels/residual_norm.py) against float32, and a refiner's render with it against the
render with Inductor's kernels in its place, compiled and captured as the pipeline runs it."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [  # (B, N, D)
    (1, 3600, 2048),    # 14b refiner at 720p: one latent frame's noisy tokens
    (2, 884, 2048),     # its context at two streams
    (3, 77, 128),       # the tiny refiner's width; N not a multiple of the rows a program takes
    (1, 5, 96),         # a width that is not a power of two
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_norm_gives_the_sum_and_its_modulated_norm(shape, dtype):
    """The sum and the modulated norm each within one rounding of float32's, and rarely off
    its rounding; the modulation rows as views of one [B, 6D] tensor, as the blocks split
    them."""
    from helios.kernels.residual_norm import residual_norm

    b, n, d = shape
    gen = torch.Generator(device="cuda").manual_seed(5 + hash(shape) % 2**31)
    x, y = (torch.randn(b, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    rows = 0.5 * torch.randn(b, 6 * d, device="cuda", dtype=dtype, generator=gen)
    gate, shift, scale = (m[:, None] for m in rows.chunk(6, -1)[2:5])
    x_out, h = residual_norm(x, y, gate, shift, scale, 1e-6)

    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    terms = x.float().abs() + (gate.float() * y.float()).abs()
    want_x = x.float() + gate.float() * y.float()
    normed = torch.nn.functional.layer_norm(x_out.float(), (d,), eps=1e-6)
    want_h = normed * (1 + scale.float()) + shift.float()
    h_terms = (normed * (1 + scale.float())).abs() + shift.float().abs()
    # One rounding of the result (below the smallest normal number an absolute one: float16's
    # subnormals are 2^-24 apart), plus float32's own differences (a fused multiply-add, another
    # order of the row's sums) at the scale of the terms, where they cancel.
    for got, want, scale_of_terms in ((x_out, want_x, terms), (h, want_h, h_terms)):
        rounding = eps * want.abs().clamp(min=tiny)
        excess = (got.float() - want).abs() - rounding - 2**-16 * scale_of_terms
        assert excess.max().item() <= 0, excess.max().item()
        assert (got != want.to(dtype)).float().mean().item() < 1e-2


def test_residual_norm_rejects_bad_shapes():
    from helios.kernels.residual_norm import residual_norm

    x = torch.zeros(1, 8, 32, device="cuda", dtype=torch.bfloat16)
    m = torch.zeros(1, 1, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^y must have x's shape \[1, 8, 32\], got \[1, 7, 32\]$"):
        residual_norm(x, x[:, :7], m, m, m, 1e-6)
    with pytest.raises(ValueError, match=r"^shift must have shape \[1, 1, 32\] with its last "
                                         r"dimension contiguous, got \[1, 1, 16\] strides "
                                         r"\[32, 32, 2\]$"):
        residual_norm(x, x, m, m[..., ::2], m, 1e-6)


def test_a_render_with_the_norm_kernel_matches_inductors(monkeypatch):
    """A small refiner of the 14b's head size, compiled and each render captured as the pipeline
    runs it: with the kernel (the default) and with Inductor's kernels
    (``use_kernel(True, norms=False)``) the rendered latents agree, and the kernel is taken."""
    from helios import attention
    from helios.config import RefinerConfig
    from helios.kernels import residual_norm as module
    from helios.refiner import Refiner

    calls = []
    kernel = module.residual_norm
    monkeypatch.setattr(module, "residual_norm", lambda *a: calls.append(1) or kernel(*a))

    cfg = RefinerConfig(hidden_size=512, num_heads=4, num_layers=3, history_pool=2,
                        plan_tokens_per_frame=4, codebook_size=64)
    torch.manual_seed(6)
    refiner = Refiner(cfg).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():  # no zero gates: every residual branch counts
        for p in refiner.parameters():
            p.normal_(0, 0.05)
    gen = torch.Generator(device="cuda").manual_seed(7)
    noise = torch.randn(1, 16, 24, 40, device="cuda", dtype=torch.bfloat16, generator=gen)
    plan = torch.randint(0, 64, (1, 4), device="cuda", generator=gen)
    history = [torch.randn_like(noise) for _ in range(2)]
    outs, taken = [], []
    try:
        for norms in (True, False):
            attention.use_kernel(True, norms=norms)
            torch._dynamo.reset()
            refiner.compile_steps()
            refiner.capture_renders()
            with torch.no_grad():
                refiner.render(noise, plan, noise, history)   # compiles, then captures
                outs.append(refiner.render(noise, plan, noise, history).float())
            taken.append(len(calls))
    finally:
        attention.use_kernel(True)
        torch._dynamo.reset()
    # Called while compiling and capturing (the graph replays it), never with the switch off.
    assert taken[0] > 0 and taken[1] == taken[0], taken
    fused, inductor = outs
    rel = ((fused - inductor).norm() / inductor.norm()).item()
    assert rel < 2e-2, rel

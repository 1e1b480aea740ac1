"""On a GPU: the Triton-lang kernel of helios/kernels/ against a float64 reference, over shapes from
the tiny config to the 14b refiner's, with fresh random inputs and poisoned outputs."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [  # (B, H, Nq, Nc, D)
    (1, 4, 64, 56, 32),          # tiny refiner
    (2, 3, 77, 0, 64),           # first frame: no context; Nq not a multiple of the tile
    (1, 2, 130, 17, 128),
    (3, 16, 200, 333, 128),
    (1, 16, 3600, 888, 128),     # 14b refiner at 720p: 3600 noisy tokens, 888 context
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype):
    from helios.kernels.context_attention import context_attention

    b, h, nq, nc, d = shape
    gen = torch.Generator(device="cuda").manual_seed(hash(shape) % 2**31)
    r = lambda n: torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen)  # noqa: E731
    q, kc, vc, ks, vs = r(nq), r(nc), r(nc), r(nq), r(nq)
    out = torch.full_like(q, float("nan"))            # every element must be written
    context_attention(q, kc, vc, ks, vs, out=out)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), torch.cat([kc, ks], 2).double(), torch.cat([vc, vs], 2).double())
    assert not out.isnan().any()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_kernel_rejects_bad_shapes():
    from helios.kernels.context_attention import context_attention

    q = torch.randn(1, 2, 8, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^k_ctx must have shape \[1, 2, N, 32\], got \[1, 3, 4, 32\]$"):
        context_attention(q, torch.zeros(1, 3, 4, 32, device="cuda", dtype=torch.bfloat16),
                          q[:, :, :4], q, q)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_aot_entry_point_matches_reference(shape):
    """The kernel the TensorRT engine embeds: dense inputs, TensorRT's argument order
    (inputs, scalars, output), heads and scale compiled in."""
    from helios.kernels.context_attention import context_attention_dense

    b, h, nq, nc, d = shape
    gen = torch.Generator(device="cuda").manual_seed(1 + hash(shape) % 2**31)
    r = lambda n: torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, kc, vc, ks, vs = r(nq), r(nc), r(nc), r(nq), r(nq)
    out = context_attention_dense(q, kc, vc, ks, vs, scale=0.1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), torch.cat([kc, ks], 2).double(), torch.cat([vc, vs], 2).double(), scale=0.1)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_aot_kernel_compiles_to_ptx_with_the_plugin_signature():
    """What the plugin's aot_impl hands TensorRT: PTX whose entry takes the 9 parameters
    TensorRT passes (5 inputs, 3 int32 scalars, 1 output) and no Triton scratch buffers."""
    import re

    from helios.kernels.context_attention import compile_aot

    compiled, name = compile_aot("bf16", 16, 128, 128 ** -0.5)
    ptx = compiled.asm["ptx"]
    entry = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    assert entry is not None
    params = re.findall(r"\.param \.(\w+)", entry.group(1))
    # Newer Triton appends two scratch pointers to every kernel; they must be unused here.
    assert params[:9] == ["u64"] * 5 + ["u32"] * 3 + ["u64"], params
    assert compiled.metadata.shared > 0


def _flash_attention_installed() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10):
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _flash_attention_installed(),
                    reason="needs flash_attn.cute (flash-attn-4) on a Hopper or Blackwell GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_flash_attention_path_matches_reference(shape, compiled):
    """helios.attention with FlashAttention-4 installed: it is the path taken, in the refiner's
    [B, N, H, D] memory layout, eager and under torch.compile (the concatenation in the
    graph), and it matches a float64 reference as the Triton-lang kernel does."""
    from helios import attention

    b, h, nq, nc, d = shape
    gen = torch.Generator(device="cuda").manual_seed(2 + hash(shape) % 2**31)
    r = lambda n: torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                              generator=gen).transpose(1, 2)
    q, kc, vc, ks, vs = r(nq), r(nc), r(nc), r(nq), r(nq)
    attention.use_kernel(True)
    try:
        fn = torch.compile(attention.context_attention, fullgraph=True) if compiled \
            else attention.context_attention
        out = fn(q, kc, vc, ks, vs)
        assert attention._flash_selected()
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    finally:
        attention.use_kernel(True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), torch.cat([kc, ks], 2).double(), torch.cat([vc, vs], 2).double())
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def _normed_heads(qkv, h, q_norm, k_norm):
    """The block's eager path: q, k normed and v, each [B, N, H, D]."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, h, -1).permute(2, 0, 1, 3, 4)
    return q_norm(q), k_norm(k), v


def _context_and_norms(shape, dtype, gen):
    """The context's keys and values in the [B, H, Nc, D] view the refiner keeps them in, and
    the q and k norms with random weights (k's with another epsilon)."""
    from helios.refiner import HeadRMSNorm

    b, h, _, nc, d = shape
    kc, vc = (torch.randn(b, nc, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
              for _ in range(2))
    q_norm, k_norm = HeadRMSNorm(d).cuda().to(dtype), HeadRMSNorm(d, eps=1e-5).cuda().to(dtype)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(torch.randn(d, device="cuda", generator=gen))
    return kc, vc, q_norm, k_norm


def _assert_normed_alike(got, want, dtype):
    """Two roundings (the norm's, the weight's): a last bit apart in the first can be two in
    the second; and rarely apart at all."""
    ulps = ((got.float() - want.float()).abs()
            / (torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)))
    assert ulps.max().item() <= 2, ulps.max().item()
    assert (got != want).float().mean().item() < 1e-2, (got != want).float().mean().item()


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_pack_gives_the_blocks_norms_and_concatenation(shape, dtype):
    """helios/kernels/qkv_pack.py against the eager modules: the context's rows and the values
    copied exactly; q and k normed as HeadRMSNorm rounds them, within two units in the last
    place where the two reciprocal square roots differ, and rarely; the context in the [B, H,
    Nc, D] view the refiner keeps it in."""
    from helios.kernels.qkv_pack import qkv_pack

    b, h, nq, nc, d = shape
    gen = torch.Generator(device="cuda").manual_seed(3 + hash(shape) % 2**31)
    qkv = 3 * torch.randn(b, nq, 3 * h * d, device="cuda", dtype=dtype, generator=gen)
    kc, vc, q_norm, k_norm = _context_and_norms(shape, dtype, gen)
    with torch.no_grad():
        eq, ek, ev = _normed_heads(qkv, h, q_norm, k_norm)
        q, k, v = qkv_pack(qkv, kc, vc, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps)
    assert q.shape == (b, nq, h, d) and k.shape == v.shape == (b, nc + nq, h, d)
    assert torch.equal(k[:, :nc], kc.transpose(1, 2)) and torch.equal(v[:, :nc], vc.transpose(1, 2))
    assert torch.equal(v[:, nc:], ev)
    for got, want in ((q, eq), (k[:, nc:], ek)):
        _assert_normed_alike(got, want, dtype)


def test_qkv_pack_rejects_bad_shapes():
    from helios.kernels.qkv_pack import qkv_pack

    kc = torch.zeros(1, 2, 4, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^qkv must have shape \[1, N, 192\] and v_ctx \[1, 2, 4, "
                                         r"32\], got \[1, 8, 190\] and \[1, 2, 4, 32\]$"):
        qkv_pack(torch.zeros(1, 8, 190, device="cuda", dtype=torch.bfloat16), kc, kc, w, w,
                 1e-6, 1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_rows_writes_the_product_after_the_context(shape, dtype):
    """helios/kernels/qkv_pack.py's qkv_rows against the eager block: the context's keys and
    values copied exactly into the rows before the product's; the values the product's as
    F.linear gives them, within one rounding; q and k normed as HeadRMSNorm rounds F.linear's,
    within two units in the last place, and rarely off; one product per batch element."""
    import torch.nn.functional as F

    from helios.kernels.qkv_pack import qkv_rows

    b, h, nq, nc, d = shape
    c = 2 * h * d
    gen = torch.Generator(device="cuda").manual_seed(5 + hash(shape) % 2**31)
    x = torch.randn(b, nq, c, device="cuda", dtype=dtype, generator=gen)
    weight = (torch.randn(3 * h * d, c, device="cuda", generator=gen) * 3 / c ** 0.5).to(dtype)
    bias = torch.randn(3 * h * d, device="cuda", dtype=dtype, generator=gen)
    kc, vc, q_norm, k_norm = _context_and_norms(shape, dtype, gen)
    with torch.no_grad():
        product = F.linear(x, weight, bias)
        eq, ek, ev = _normed_heads(product, h, q_norm, k_norm)
        rows = qkv_rows(x, weight, bias, kc, vc, q_norm.weight, k_norm.weight, q_norm.eps,
                        k_norm.eps)
    assert rows.shape == (b, nc + nq, 3 * h * d)
    _, k, v = rows.view(b, nc + nq, 3, h, d).unbind(2)
    q = rows.view(b, nc + nq, 3, h, d)[:, nc:, 0]
    assert torch.equal(k[:, :nc], kc.transpose(1, 2)) and torch.equal(v[:, :nc], vc.transpose(1, 2))
    eps = torch.finfo(dtype).eps
    assert ((v[:, nc:].float() - ev.float()).abs() <= eps * ev.float().abs()).all()
    for got, want in ((q, eq), (k[:, nc:], ek)):
        _assert_normed_alike(got, want, dtype)


def test_qkv_rows_rejects_bad_shapes():
    from helios.kernels.qkv_pack import qkv_rows

    kc = torch.zeros(1, 2, 4, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^h must have shape \[1, N, C\], weight \[192, C\], "
                                         r"bias \[192\] and v_ctx \[1, 2, 4, 32\], got \[1, 8, "
                                         r"64\], \[190, 64\], \[192\] and \[1, 2, 4, 32\]$"):
        qkv_rows(torch.zeros(1, 8, 64, device="cuda", dtype=torch.bfloat16),
                 torch.zeros(190, 64, device="cuda", dtype=torch.bfloat16),
                 torch.zeros(192, device="cuda", dtype=torch.bfloat16), kc, kc, w, w, 1e-6, 1e-6)


@pytest.mark.skipif(not _flash_attention_installed(),
                    reason="needs flash_attn.cute (flash-attn-4) on a Hopper or Blackwell GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_packed_block_attends_as_the_unpacked_one(compiled):
    """DiTBlock.attend_normed with FlashAttention-4: the product written into its inputs (the
    default for one stream), the product packed by the kernel (``rows=False``) and the
    unpacked path (``pack=False``) give the same attention, at the 14b refiner's head size and
    720p's token counts, eager and compiled; each path is taken where it is switched on, and
    the rows never for a batch of two."""
    from helios import attention
    from helios.config import RefinerConfig
    from helios.refiner import DiTBlock

    cfg = RefinerConfig(hidden_size=512, num_heads=4, num_layers=1)
    assert cfg.head_dim == 128
    block = DiTBlock(cfg).cuda().to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(1, 3600, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    kc, vc = (torch.randn(1, 888, 4, 128, device="cuda", dtype=torch.bfloat16,
                          generator=gen).transpose(1, 2) for _ in range(2))
    mods = [0.1 * torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(6)]
    outs = []

    def attend(x):
        return block.attend_normed(block.normed(x, mods), kc, vc)

    try:
        for pack, rows in ((True, True), (True, False), (False, False)):
            attention.use_kernel(True, pack=pack, rows=rows)
            torch._dynamo.reset()
            fn = torch.compile(attend, fullgraph=True) if compiled else attend
            with torch.no_grad():
                outs.append(fn(x))
                h = block.normed(x, mods)
                assert attention.packs(block.qkv(h), 128) is pack
                assert attention.takes_rows(h, block.qkv, 128) is rows
                assert not attention.takes_rows(h.expand(2, -1, -1), block.qkv, 128)
    finally:
        attention.use_kernel(True)
        torch._dynamo.reset()
    rowed, packed, unpacked = outs
    assert rowed.shape == packed.shape == unpacked.shape == (1, 4, 3600, 128)
    for got in (rowed, packed):
        rel = ((got.float() - unpacked.float()).norm() / unpacked.float().norm()).item()
        assert rel < 1e-2, rel

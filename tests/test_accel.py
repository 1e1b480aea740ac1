"""helios/accel.py: the compiled refiner renders what the eager one does (CPU inductor here,
the same code path the GPU compiles), and a piece that fails to compile runs eagerly."""

import logging

import torch

from helios.accel import CompiledOrEager
from helios.checkpoint import random_component
from helios.config import get_config


def test_compiled_refiner_equals_eager_on_every_context_length():
    cfg = get_config("tiny")
    rf = random_component(cfg, "refiner", "cpu", torch.float32, 1)
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(shape, generator=g) for _ in range(4)]
    plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.plan_tokens_per_frame), generator=g)
    cases = [(None, []), (z[1], [z[2], z[3]])]  # first frame, then a longer context
    eager = [rf.render(z[0], plan, a, h) for a, h in cases]
    rf.compile_steps()
    for (a, h), e in zip(cases, eager):
        assert torch.allclose(rf.render(z[0], plan, a, h), e, atol=1e-4, rtol=1e-4)
    assert rf._compiled_step.compiled and rf._compiled_context.compiled


def test_the_compiled_vae_decoder_equals_eager_with_its_norms_summed_per_channel(monkeypatch):
    """Under torch.compile the decoder's group norms take their statistics from sums per
    channel (helios.vae.GroupNorm); the frames stay eager's, in both memory layouts."""
    from helios import vae as vae_module
    from helios.vae import group_norm_by_channels

    traced = []  # the norms the compiler traced through group_norm_by_channels
    monkeypatch.setattr(vae_module, "group_norm_by_channels",
                        lambda norm, x: traced.append(norm) or group_norm_by_channels(norm, x))

    cfg = get_config("tiny")
    vae = random_component(cfg, "vae", "cpu", torch.float32, 2)
    g = torch.Generator().manual_seed(0)
    norm = vae.decoder.norm_out
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
        x = 3 + 2 * torch.randn(2, norm.num_channels, 6, 10, generator=g)
        torch.testing.assert_close(group_norm_by_channels(norm, x), norm(x), rtol=1e-5, atol=1e-5)
        # Not the identity of its input: a norm without its affine part is not the same.
        assert (group_norm_by_channels(norm, x) - x).abs().max() > 1
        shape = (1, cfg.vae.latent_channels, cfg.latent_height, cfg.latent_width)
        z, prev = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        eager = vae.decode(z, prev)
        assert traced == []
        compiled = CompiledOrEager(vae.decoder.forward, "VAE decoder")
        for layout in (torch.contiguous_format, torch.channels_last):
            out = compiled(z.contiguous(memory_format=layout), prev.contiguous(memory_format=layout))
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        assert compiled.compiled
        norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert {id(m) for m in traced} == {id(m) for m in norms}


def test_a_piece_that_cannot_compile_runs_eagerly_with_a_warning(caplog):
    def fn(x):
        torch._dynamo.graph_break()  # fullgraph=True refuses this
        return x * 2

    piece = CompiledOrEager(fn, "test piece", fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="helios.accel"):
        out = piece(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert not piece.compiled
    assert "test piece stays eager, torch.compile failed" in caplog.text


def test_a_piece_whose_compiler_cannot_load_runs_eagerly(caplog, monkeypatch):
    """torch.compile itself can fail: in a process with an ASCII locale, loading Inductor's
    templates raises UnicodeDecodeError (seen in a Triton python-backend stub)."""
    def broken(*args, **kwargs):
        raise UnicodeDecodeError("ascii", b"\xe2", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="helios.accel"):
        piece = CompiledOrEager(lambda x: x + 1, "test piece")
    assert not piece.compiled and torch.equal(piece(torch.zeros(2)), torch.ones(2))
    assert "test piece stays eager, torch.compile failed: UnicodeDecodeError" in caplog.text


def test_the_attention_switches_are_read_from_the_environment():
    """HELIOS_FLASH_ATTENTION, HELIOS_QKV_PACK, HELIOS_QKV_ROWS and HELIOS_RESIDUAL_NORM beside
    HELIOS_ATTENTION_KERNEL: on by default, 0 switches them off (use_settings passes them on),
    anything else is one line naming the variable."""
    import importlib.util

    import pytest

    from helios import attention
    from helios.errors import HeliosError
    from helios.settings import from_environment

    for name, field in (("HELIOS_FLASH_ATTENTION", "flash_attention"),
                        ("HELIOS_QKV_PACK", "qkv_pack"),
                        ("HELIOS_QKV_ROWS", "qkv_rows"),
                        ("HELIOS_RESIDUAL_NORM", "residual_norm")):
        assert getattr(from_environment({}), field) is True
        assert getattr(from_environment({name: "0"}), field) is False
        with pytest.raises(HeliosError, match=rf"^{name} must be 0 or 1, got 'yes'$"):
            from_environment({name: "yes"})
    triton = importlib.util.find_spec("triton") is not None
    try:
        attention.use_settings(from_environment({"HELIOS_QKV_PACK": "0"}))
        assert attention._state["pack"] is False and attention._state["flash"] is True
        assert attention.norms_selected() is triton
        attention.use_settings(from_environment({"HELIOS_QKV_ROWS": "0"}))
        assert attention._state["rows"] is False and attention._state["pack"] is True
        attention.use_settings(from_environment({"HELIOS_RESIDUAL_NORM": "0"}))
        assert attention._state["pack"] is True and not attention.norms_selected()
        assert attention._state["rows"] is True
        attention.use_settings(from_environment({"HELIOS_ATTENTION_KERNEL": "0"}))
        assert not attention.norms_selected()
    finally:
        attention.use_kernel(True)
    assert attention._state["pack"] is True and attention.norms_selected() is triton
    assert attention._state["rows"] is True


def test_the_ar_steps_tuning_follows_inductors_own_switch_off_by_default():
    """TORCHINDUCTOR_COORDINATE_DESCENT_TUNING, read where every switch is read: the AR decode
    step tunes only where it is 1, as Inductor does."""
    from helios.settings import from_environment

    assert from_environment({}).ar_step_tuning is False
    assert from_environment({"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}).ar_step_tuning
    assert from_environment({"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "0"}).ar_step_tuning is False


def test_flash_attention_is_selected_on_hopper_and_blackwell_only(monkeypatch):
    """FlashAttention-4 runs the CUDA attention only where flash_attn.cute imports, on compute
    capability 9 or 10, and not when switched off; elsewhere the backend names what runs."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    import torch

    from helios import attention

    def flash_attn_func(q, k, v, softmax_scale=None):  # stands in for the installed package
        return q, None

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    selected = {}
    try:
        for major in (8, 9, 10, 12):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, m=major: (m, 0))
            attention.use_kernel(True)
            selected[major] = attention._flash_selected()
        assert selected == {8: False, 9: True, 10: True, 12: False}
        assert attention.backend() in ("triton kernel", "sdpa")   # capability 12
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        attention.use_kernel(True, flash=False)
        assert not attention._flash_selected()
        attention.use_kernel(True)
        assert attention.backend() == "flash_attn.cute"
        # The packing kernel goes with FlashAttention-4 where triton is there, unless switched off.
        assert attention._pack_selected() is (importlib.util.find_spec("triton") is not None)
        attention.use_kernel(True, pack=False)
        assert attention.backend() == "flash_attn.cute" and not attention._pack_selected()
    finally:
        attention.use_kernel(True)

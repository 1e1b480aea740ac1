"""Refiner: the cached context K/V and the custom attention are exact."""

import torch
import torch.nn.functional as F

from helios.attention import context_attention, context_attention_reference
from helios.checkpoint import load_component


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_custom_attention_equals_sdpa_over_concatenation():
    for seed, (nc, ns) in enumerate([(40, 64), (0, 17), (5, 1), (300, 33)]):
        q = _rand(2, 4, ns, 32, seed=seed)
        kc, vc = _rand(2, 4, nc, 32, seed=seed + 10), _rand(2, 4, nc, 32, seed=seed + 20)
        ks, vs = _rand(2, 4, ns, 32, seed=seed + 30), _rand(2, 4, ns, 32, seed=seed + 40)
        ref = F.scaled_dot_product_attention(q, torch.cat([kc, ks], 2), torch.cat([vc, vs], 2))
        torch.testing.assert_close(context_attention_reference(q, kc, vc, ks, vs), ref,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(context_attention(q, kc, vc, ks, vs), ref, rtol=1e-5, atol=1e-5)


def test_refiner_cached_history_equals_recompute(tiny_checkpoint, tiny_config):
    refiner = load_component(tiny_checkpoint, "refiner")
    cfg = tiny_config
    shape = (2, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    plan = torch.randint(0, cfg.refiner.codebook_size, (2, cfg.plan_tokens_per_frame),
                         generator=torch.Generator().manual_seed(0))
    anchor = _rand(*shape, seed=1)
    history = [_rand(*shape, seed=2), _rand(*shape, seed=3)]
    x = _rand(*shape, seed=4)
    with torch.no_grad():
        kv = refiner.encode_context(plan, anchor, history)
        for sigma in refiner.sigmas()[:-1]:  # the same cached K/V serves every step
            fast = refiner(x, sigma, kv)
            slow = refiner.forward_reference(x, sigma, plan, anchor, history)
            torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
        # The check can fail: another history changes the output by far more than the tolerance.
        other = refiner.forward_reference(x, 0.5, plan, anchor, history[::-1])
        assert (other - refiner(x, 0.5, kv)).abs().max() > 1e-2
        # First frame: plan tokens only, no anchor or history.
        torch.testing.assert_close(refiner(x, 0.5, refiner.encode_context(plan)),
                                   refiner.forward_reference(x, 0.5, plan), rtol=1e-4, atol=1e-4)


def test_a_renders_modulations_at_once_equal_those_of_each_step(tiny_checkpoint, tiny_config):
    """A render computes adaLN's vectors of every sigma it visits in one product per block;
    they are those each step would compute, and the render equals one made step by step."""
    from helios.refiner import euler_sample, modulation_level

    refiner = load_component(tiny_checkpoint, "refiner")
    cfg = tiny_config
    shape = (2, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    plan = torch.randint(0, cfg.refiner.codebook_size, (2, cfg.plan_tokens_per_frame),
                         generator=torch.Generator().manual_seed(0))
    anchor, x = _rand(*shape, seed=1), _rand(*shape, seed=4)
    sig = refiner.sigmas()
    sig_t = torch.tensor(sig)
    d = cfg.refiner.hidden_size
    with torch.no_grad():
        blocks, final = refiner._render_modulations(sig_t, 2)
        assert [m.shape for m in blocks] == [(len(sig), 2, 6 * d)] * cfg.refiner.num_layers
        assert final.shape == (len(sig), 2, 2 * d)
        # Level 0 is the context's (sigma 0), then one per step.
        for level, sigma in enumerate([0.0, *sig[:-1]]):
            want_blocks, want_final = refiner.modulations(refiner._cond(sigma, 2, torch.float32, "cpu"))
            for got, want in zip([m[level] for m in blocks] + [final[level]],
                                 [*want_blocks, want_final]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        kv = refiner.encode_context(plan, anchor)
        by_step = euler_sample(lambda z, i, s: refiner(z, sig_t[i], kv), x, sig)
        torch.testing.assert_close(refiner._render(x, plan, anchor, [], sig, sig_t), by_step,
                                   rtol=1e-4, atol=1e-4)
        # The rows made once ahead, as a captured render holds them, give the same render;
        # the render reads the rows it is given (other sigmas' change it).
        ahead = refiner._render(x, plan, anchor, [], sig, sig_t, (blocks, final))
        assert torch.equal(ahead, refiner._render(x, plan, anchor, [], sig, sig_t))
        other = refiner._render_modulations(sig_t / 2, 2)
        assert (refiner._render(x, plan, anchor, [], sig, sig_t, other) - ahead).abs().max() > 1e-2
        # The check can fail: the context's rows in every step's place change the render.
        context_rows = modulation_level((blocks, final), 0)
        wrong = euler_sample(lambda z, i, s: refiner(z, sig_t[i], kv, context_rows), x, sig)
        assert (wrong - by_step).abs().max() > 1e-2


def test_vae_decoder_streams_statelessly(tiny_checkpoint, tiny_config):
    """Decoding latent frames one call at a time equals decoding them as one batch."""
    vae = load_component(tiny_checkpoint, "vae")
    cfg = tiny_config
    z = _rand(5, cfg.vae.latent_channels, cfg.latent_height, cfg.latent_width, seed=0)
    with torch.no_grad():
        prev = torch.cat([torch.zeros_like(z[:1]), z[:-1]])
        batch = vae.decode(z, prev)
        one_by_one = torch.cat([vae.decode(z[i:i + 1], None if i == 0 else z[i - 1:i])
                                for i in range(5)])
    assert batch.shape == (5, 4, 3, cfg.height, cfg.width)
    torch.testing.assert_close(one_by_one, batch, rtol=1e-5, atol=1e-5)


def test_linear_gelu_operator_is_the_projection_then_tanh_gelu():
    # The refiner's MLP on CUDA runs helios::linear_gelu (cuBLASLt's GELU epilogue, checked
    # on a GPU in tests/test_cuda_graphs.py); its CPU kernel is the same function.
    from helios.refiner import _linear_gelu

    x, w, b = _rand(37, 24, seed=0), _rand(40, 24, seed=1), _rand(40, seed=2)
    out = _linear_gelu(x, w, b)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b), approximate="tanh"),
                               rtol=1e-6, atol=1e-6)
    assert (out - F.gelu(F.linear(x, w, b))).abs().max() > 1e-4  # the tanh form, not erf

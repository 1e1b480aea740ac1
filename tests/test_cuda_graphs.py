"""On a GPU: the CUDA-graph decode step (captured once, replayed; compiled or not; bf16 or
FP8 weights; with the one-row products by helios::gemv) gives the logits of the general eager
path, step after step, for one and several streams; the compiled refiner renders what the
eager one does. Skips without CUDA."""

import pytest
import torch

from helios import ar_backbone
from helios.ar_backbone import ARBackbone
from helios.ar_runtime import ARRuntime
from helios.config import get_config
from helios.fp8 import quantize_ar
from helios.kv_cache import PagedKVCache
from helios.sampling import (SamplingParams, draw, probabilities, row_settings, sample_rows,
                             uses_filters)
from helios.schedule import plan_vocab_bias

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_ar(dev) -> ARBackbone:
    """The tiny AR backbone, seeded, in bf16 on ``dev``."""
    model = ARBackbone(get_config("tiny").ar_backbone)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.to(dev, torch.bfloat16).eval()


def _graph_and_eager(model, batch: int, compiled: bool):
    """A captured runtime (compiled or not) and an eager one over ``model``, each with the
    same ``batch`` sequences added (seeded prefixes); returns them and the sequence ids."""
    cfg = model.config
    dev = next(model.parameters()).device
    graph = ARRuntime(model, num_blocks=64, block_size=16, device=dev, cuda_graphs=True,
                      max_positions=256, compile_steps=compiled)
    eager = ARRuntime(model, num_blocks=64, block_size=16, device=dev, static_decode=False)
    ids = list(range(batch))
    for rt in (graph, eager):
        for i in ids:
            prefix = torch.randn(5 + 7 * i, cfg.hidden_size, generator=torch.Generator().manual_seed(i))
            rt.add_sequence(i, prefix, [cfg.bos_token_id], SamplingParams(seed=i), bias=plan_vocab_bias(cfg))
    return graph, eager, ids


def _compare_decodes(graph, eager, ids, steps: int, before=lambda side: None) -> None:
    """Decode ``steps`` tokens on both runtimes, the eager side's argmax fed to both, and check
    each step's logits agree; ``before(side)`` runs before the "graph" and the "eager" side's
    step."""
    cfg = graph.model.config
    with torch.no_grad():
        for step in range(steps):
            assert graph._static_fits(ids) == (step > 0)  # the prefill goes the general way
            before("graph")
            if step == 0:
                g = torch.stack([graph.logits(i) for i in ids])
            else:
                g = graph._static_step(ids).clone()
            before("eager")
            e = torch.stack([eager.logits(i) for i in ids])
            rel = ((g - e).norm() / e.norm()).item()
            assert rel < 2e-2, (step, rel)
            for i, tok in zip(ids, e.argmax(-1).tolist()):
                graph.seqs[i].tokens.append(tok % cfg.plan_vocab_size)
                eager.seqs[i].tokens.append(tok % cfg.plan_vocab_size)


@pytest.mark.parametrize("batch,compiled,fp8", [(1, False, False), (3, False, False),
                                                (1, True, False), (3, True, False),
                                                (1, True, True), (3, True, True)])
def test_cuda_graph_decode_matches_eager(batch, compiled, fp8):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = _tiny_ar(dev)
    if fp8:  # the split-K GEMV inside the compiled, captured step; the eager side runs it too
        quantize_ar(model)
    graph, eager, ids = _graph_and_eager(model, batch, compiled)
    _compare_decodes(graph, eager, ids, 40)  # crosses several 16-position blocks
    assert graph._static[batch].graph is not None
    assert graph._static[batch].compiled == compiled


@pytest.fixture
def gemv_on():
    was = ar_backbone._GEMV["on"]
    ar_backbone.use_gemv(True)
    yield
    ar_backbone.use_gemv(was)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_captured_step_with_the_gemv_matches_eager_cublas(batch, gemv_on, monkeypatch):
    """The compiled, captured step with one-row products by ``helios::gemv`` (the Triton-lang
    kernel of helios/kernels/gemv.py) against the eager step with cuBLAS's."""
    graph, eager, ids = _graph_and_eager(_tiny_ar(torch.device("cuda")), batch, True)
    calls = []
    real = ar_backbone._gemv
    monkeypatch.setattr(ar_backbone, "_gemv", lambda x, w: calls.append(x.shape) or real(x, w))
    # The graph side with the kernel; the reference, eager, with cuBLAS.
    _compare_decodes(graph, eager, ids, 20, before=lambda side: ar_backbone.use_gemv(side == "graph"))
    assert graph._static[batch].compiled
    # One row per step: the kernel was traced into the step; several rows: never.
    assert bool(calls) == (batch == 1)


def test_captured_decode_steps_leave_no_autograd_graph_in_the_cache():
    """prepare_static compiles, warms up and captures each batch size's step before a server
    takes requests, outside any no_grad: no autograd graph may reach the cache (one did, and
    it kept every layer's gathered keys and values: about 36 GiB at 14b for four streams)."""
    dev = torch.device("cuda")
    rt = ARRuntime(_tiny_ar(dev), num_blocks=64, block_size=16, device=dev, cuda_graphs=True,
                   max_positions=256, compile_steps=True)
    rt.prepare_static([1, 2, 3])
    assert all(rt._static[b].graph is not None for b in (1, 2, 3))
    for pool in (rt.cache.k, rt.cache.v):
        assert not pool.requires_grad and pool.grad_fn is None


def test_an_eager_forward_over_the_paged_cache_never_waits_for_the_gpu():
    """A prefill (and a speculative verify) runs eagerly, some 40 kernels a layer. One
    host-device synchronisation inside it (a boolean index has the device count its rows)
    holds the host at every layer, and the forward runs at the speed of its launches: the
    prompt's prefill is part of every stream's first frame and every prompt switch."""
    cfg = get_config("tiny").ar_backbone
    dev = torch.device("cuda")
    model = _tiny_ar(dev)
    cache = PagedKVCache.for_model(cfg, 64, 16, torch.bfloat16, dev)
    for s in "ab":
        cache.add_sequence(s)
    x = torch.randn(2, 37, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            layout = cache.prepare(["a", "b"], [37, 20])  # rows of uneven lengths: padding
            logits = model(x, layout.positions, cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (2, 37, cfg.vocab_size) and torch.isfinite(logits[0]).all()
    assert cache.lengths == {"a": 37, "b": 20}


def test_the_device_sampler_draws_what_the_host_draws():
    """sample_rows on the GPU (inside the captured step) picks the token that probabilities()
    and draw() pick on the host, for greedy, temperature, top-k and top-p rows."""
    dev = torch.device("cuda")
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t, k, p in [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 50, 1.0), (0.8, 0, 0.9)]]
    settings = {k: v.to(dev) for k, v in row_settings(params).items()}
    got, want = [], []
    for seed in range(16):
        logits = torch.randn(4, 8195, generator=torch.Generator().manual_seed(seed)) * 3
        logits[:, 8192:] = float("-inf")  # the special tokens, as the plan bias masks them
        gens = [lambda i=i: torch.Generator().manual_seed(100 * seed + i) for i in range(4)]
        u = torch.tensor([torch.rand((), generator=g(), dtype=torch.float64).item() for g in gens])
        got += sample_rows(logits.to(dev), u=u.to(dev), **settings).tolist()
        want += [draw(probabilities(logits[i], p), gens[i]()) for i, p in enumerate(params)]
    assert got == want


def test_the_captured_step_filters_only_when_a_row_asks():
    """The decode step is captured twice: sampling with top-k and top-p, and without (no
    sorts of the vocabulary). set_rows picks the one its rows need, and each draws from its
    logits the tokens the host draws; the plain one would not, for rows that filter."""
    dev = torch.device("cuda")
    rt = ARRuntime(_tiny_ar(dev), num_blocks=64, block_size=16, device=dev, cuda_graphs=True,
                   max_positions=256)
    rt.prepare_static([2])
    runner = rt.static_step(2)
    vocab = runner.bias.shape[1]
    plain = [SamplingParams(temperature=1.5), SamplingParams(temperature=2.0)]
    filtered = [SamplingParams(temperature=1.5, top_k=2),
                SamplingParams(temperature=2.0, top_p=0.3)]

    def replay(graph, params, seed):  # -> (tokens sampled, tokens the host draws)
        gens = [lambda i=i: torch.Generator().manual_seed(10 * seed + i) for i in range(2)]
        u = [torch.rand((), generator=g(), dtype=torch.float64).item() for g in gens]
        runner.draws.copy_(torch.tensor(u, dtype=torch.float64).to(dev))
        graph.replay()
        seen = runner._logits[graph is runner.graphs[True]][:, 0].float().cpu()
        return runner.sampled.tolist(), [draw(probabilities(seen[i], p), gens[i]())
                                         for i, p in enumerate(params)]

    unfiltered_differ = 0
    with torch.no_grad():
        for params in (plain, filtered):
            runner.set_rows(params)
            assert runner.filters == uses_filters(params, vocab) == (params is filtered)
            assert runner.graph is runner.graphs[runner.filters]
            for seed in range(8):
                got, want = replay(runner.graph, params, seed)
                assert got == want
                got, want = replay(runner.graphs[False], params, seed)
                unfiltered_differ += got != want
    assert unfiltered_differ > 0


def test_a_frame_of_captured_steps_never_waits_for_the_gpu():
    """A frame's decode steps replay back to back: each feeds the token the one before it
    sampled on the device, and the host waits only for the frame's tokens at the end. They are
    the tokens of single steps that go through the host one by one."""
    cfg = get_config("tiny").ar_backbone
    dev = torch.device("cuda")
    model = _tiny_ar(dev)
    runs = []
    for frame in (False, True):
        rt = ARRuntime(model, num_blocks=64, block_size=16, device=dev, cuda_graphs=True,
                       max_positions=256)
        for i in range(2):
            prefix = torch.randn(6 + 9 * i, cfg.hidden_size, generator=torch.Generator().manual_seed(i))
            rt.add_sequence(i, prefix, [cfg.bos_token_id], SamplingParams(seed=i),
                            bias=plan_vocab_bias(cfg).repeat(4, 1))
        with torch.no_grad():
            rt.step([0, 1])  # the prefills
            rt.step([0, 1])  # the graph built and warm
            if frame:
                runner = rt.static_step(2)
                runner.set_rows([rt.seqs[i].params for i in range(2)])
                draws = [[torch.rand((), generator=rt.seqs[i].generator, dtype=torch.float64).item()
                          for i in range(2)] for _ in range(4)]
                rt.cache.reserve([0, 1], [4, 4])
                out = torch.empty(4, 2, dtype=torch.long, device=dev)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for r in range(4):
                        rt._static_step([0, 1], r, draws[r])
                        out[r].copy_(runner.sampled)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                for i, toks in enumerate(out.T.tolist()):
                    rt.seqs[i].tokens.extend(toks)
            else:
                for _ in range(4):
                    rt.step([0, 1])
        runs.append([rt.tokens(i) for i in range(2)])
    assert runs[0] == runs[1]


def test_compiled_refiner_renders_what_the_eager_one_does():
    from helios.checkpoint import random_component

    cfg = get_config("tiny")
    dev = torch.device("cuda")
    rf = random_component(cfg, "refiner", dev, torch.bfloat16, 3)
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(4)]
    plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.plan_tokens_per_frame), generator=g).to(dev)
    cases = [(None, []), (z[1], []), (z[1], [z[2], z[3]])]  # context lengths change: recompiles
    eager = [rf.render(z[0], plan, a, h) for a, h in cases]
    rf.compile_steps()
    for (a, h), e in zip(cases, eager):
        out = rf.render(z[0], plan, a, h)
        assert ((out.float() - e.float()).norm() / e.float().norm()).item() < 2e-2
    assert rf._compiled_step.compiled


def test_captured_refiner_renders_what_the_uncaptured_one_does():
    """capture_renders: one CUDA graph per context shape, replayed with new inputs each time
    (noise, plan, anchor, every history frame), gives the compiled refiner's uncaptured
    frames; the same shape is captured once."""
    from helios.checkpoint import random_component

    cfg = get_config("tiny")
    dev = torch.device("cuda")
    rf = random_component(cfg, "refiner", dev, torch.bfloat16, 3)
    rf.compile_steps()
    shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
    g = torch.Generator().manual_seed(0)

    def inputs(n_hist):
        z = [torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(2 + n_hist)]
        plan = torch.randint(0, cfg.refiner.codebook_size, (1, cfg.plan_tokens_per_frame),
                             generator=g).to(dev)
        return z[0], plan, z[1], z[2:]

    cases = [inputs(n) for n in (0, 2, 2, 1, 2)]  # the repeated shape replays with new inputs
    cases[0] = cases[0][:2] + (None, [])           # the first frame: no anchor
    plain = [rf.render(*c) for c in cases]
    rf.capture_renders()
    captured = [rf.render(*c) for c in cases]
    for e, out in zip(plain, captured):
        assert ((out.float() - e.float()).norm() / e.float().norm()).item() < 1e-2
    assert not torch.equal(captured[1], captured[2])
    assert len(rf._render_graphs) == 3
    rf.warm_up(shape, torch.bfloat16, dev)  # every context of a stream: 1 more shape
    assert len(rf._render_graphs) == 4


def test_low_vram_pipeline_gives_the_frames_of_the_resident_one(tmp_path):
    """--low-vram moves each stage onto the GPU only while it runs (the AR backbone once per
    segment, not once per token): 40 frames (two AR segments) come out as with every stage
    resident. Both eager, so that the decode steps are the same kernels."""
    from helios.checkpoint import init_checkpoint
    from helios.pipeline import HeliosPipeline

    ckpt = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    prompt = "a red circle moving left on a dark background"
    # --low-vram runs eager: so must the reference
    resident = HeliosPipeline.from_checkpoint(ckpt, device="cuda", compile=False, cuda_graphs=False)
    low = HeliosPipeline.from_checkpoint(ckpt, device="cuda", low_vram=True, compile=False,
                                         cuda_graphs=False)
    assert low.low_vram and next(low.ar_backbone.parameters()).device.type == "cpu"
    a = resident.generate_video(prompt, num_frames=40, seed=3)
    b = low.generate_video(prompt, num_frames=40, seed=3)
    assert a.shape == b.shape == (40, 128, 128, 3)
    assert (a == b).all()


def test_prefetching_pipeline_gives_the_frames_of_the_sequential_one(tmp_path):
    """The AR decoding in a thread on its own high-priority stream while the refiner renders
    (prefetch_plans=True): 40 frames (two AR segments, graph-replayed decode steps) equal
    those of the AR and refiner one after the other on one stream; so do 48 frames switched to
    another prompt at 1 s, where the prefetching thread is closed and a new one starts from
    the new prompt's prefix."""
    from helios.checkpoint import init_checkpoint
    from helios.pipeline import HeliosPipeline

    ckpt = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    prompt = "a red circle moving left on a dark background"
    # compile off: the same refiner kernels in both
    prefetching = HeliosPipeline.from_checkpoint(ckpt, device="cuda", prefetch_plans=True,
                                                 compile=False)
    sequential = HeliosPipeline.from_checkpoint(ckpt, device="cuda", compile=False)
    assert prefetching.prefetch_plans and not sequential.prefetch_plans
    assert prefetching.ar.cuda_graphs
    a = prefetching.generate_video(prompt, num_frames=40, seed=3)
    b = sequential.generate_video(prompt, num_frames=40, seed=3)
    assert (a == b).all()
    switch = [(1.0, "a blue square moving up on a dark background")]
    a = prefetching.generate_video(prompt, num_frames=48, seed=3, prompt_at=switch)
    b = sequential.generate_video(prompt, num_frames=48, seed=3, prompt_at=switch)
    assert (a == b).all()


def test_overlapped_decodes_give_the_frames_of_waited_ones(tmp_path):
    """On CUDA a pipeline queues each latent frame's decode and the next render before it waits
    for the frames (overlap_decode, on by default there): 40 frames, with and without the
    plans prefetched, equal those of a pipeline that waits for each decode first."""
    from helios.checkpoint import init_checkpoint
    from helios.pipeline import HeliosPipeline

    ckpt = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    prompt = "a red circle moving left on a dark background"
    waiting = HeliosPipeline.from_checkpoint(ckpt, device="cuda", compile=False,
                                             overlap_decode=False)
    want = waiting.generate_video(prompt, num_frames=40, seed=3)
    for prefetch in (False, True):
        over = HeliosPipeline.from_checkpoint(ckpt, device="cuda", compile=False,
                                              prefetch_plans=prefetch)
        assert over.overlap_decode and not waiting.overlap_decode
        assert (over.generate_video(prompt, num_frames=40, seed=3) == want).all(), prefetch


def test_refiner_mlp_takes_the_gelu_epilogue_and_keeps_its_numbers(monkeypatch):
    import torch.nn.functional as F

    import helios.refiner as refiner

    calls = []
    fused = refiner._linear_gelu
    monkeypatch.setattr(refiner, "_linear_gelu", lambda *a: calls.append(1) or fused(*a))
    g = torch.Generator().manual_seed(0)
    fc1 = torch.nn.Linear(256, 1024).cuda().to(torch.bfloat16)
    h = torch.randn(3, 50, 256, generator=g).cuda().to(torch.bfloat16)
    exact = F.gelu(F.linear(h.float(), fc1.weight.float(), fc1.bias.float()), approximate="tanh")
    plain = F.gelu(fc1(h), approximate="tanh")
    with torch.no_grad():
        out = refiner._fc1_gelu(fc1, h)
    assert calls and out.shape == plain.shape
    # The epilogue rounds once, from float32; the plain form rounds the product, then the GELU.
    assert (out.float() - exact).abs().max() <= (plain.float() - exact).abs().max() * 1.5
    assert (out.float() - exact).abs().max() < 0.05
    # The epilogue's GELU is the tanh form: at -3 the two forms differ by 11 %.
    zero = torch.nn.Linear(256, 8).cuda().to(torch.bfloat16)
    torch.nn.init.zeros_(zero.weight), torch.nn.init.constant_(zero.bias, -3.0)
    with torch.no_grad():
        at_minus_3 = refiner._fc1_gelu(zero, h).float()
    tanh_form = F.gelu(torch.tensor(-3.0), approximate="tanh").item()
    torch.testing.assert_close(at_minus_3, torch.full_like(at_minus_3, tanh_form), rtol=1e-2, atol=0)
    calls.clear()
    out = refiner._fc1_gelu(fc1, h)  # with gradients wanted: the plain form (no backward)
    assert not calls

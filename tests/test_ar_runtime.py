"""AR backbone + paged KV cache + speculative decoding against their references."""

import math

import numpy as np
import pytest
import torch

from helios.ar_backbone import ARBackbone
from helios.ar_runtime import ARRuntime
from helios.config import ARConfig
from helios.errors import CachePoolExhausted
from helios.kv_cache import ContiguousKVCache, PagedKVCache
from helios.schedule import plan_vocab_bias
from helios.sampling import (SamplingParams, draw, probabilities, row_settings, sample_rows,
                             speculative_accept, uses_filters)

CFG = ARConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=160, plan_vocab_size=48, max_position_embeddings=256)
BIAS = plan_vocab_bias(CFG)
DRAFT = ARConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, plan_vocab_size=48, max_position_embeddings=256)


def _model(cfg, seed):
    m = ARBackbone(cfg)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.eval()


def _prefix(n, hidden, seed):
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def full_recompute_logits(model, prefix, tokens):
    """Logits of the last position from scratch: a fresh cache, the whole context at once."""
    cache = PagedKVCache.for_model(model.config, 64, 8, torch.float32, "cpu")
    cache.add_sequence(0)
    ids = torch.tensor(tokens)
    x = torch.cat([prefix, model.model.embed_tokens(ids)])[None]
    layout = cache.prepare([0], [x.shape[1]])
    with torch.no_grad():
        return model(x, layout.positions, cache)[0, -1]


def test_kv_cache_matches_recompute():
    model = _model(CFG, 0)
    rt = ARRuntime(model, num_blocks=64, block_size=8)
    prefix = _prefix(5, CFG.hidden_size, 1)
    rt.add_sequence("a", prefix, [CFG.bos_token_id], SamplingParams(temperature=1.0, seed=3),
                    bias=BIAS)
    for _ in range(20):
        cached = rt.logits("a")
        ref = full_recompute_logits(model, prefix, rt.tokens("a"))
        torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
        rt.step(["a"])
    assert len(rt.tokens("a")) == 21
    assert max(rt.tokens("a")[1:]) < CFG.plan_vocab_size  # the bias kept out special tokens


def test_paged_equals_contiguous():
    model = _model(CFG, 1)
    paged = PagedKVCache.for_model(CFG, 40, 4, torch.float32, "cpu")
    contig = ContiguousKVCache.for_model(CFG, 3, 64, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for c in (paged, contig):
        for s in "abc":
            c.add_sequence(s)
    # Rounds of uneven lengths interleave the three sequences' blocks in the pool.
    for lens in ([7, 1, 3], [1, 5, 1], [2, 2, 9], [1, 1, 1]):
        x = torch.randn(3, max(lens), CFG.hidden_size, generator=gen)
        outs = []
        for c in (paged, contig):
            layout = c.prepare(list("abc"), lens)
            with torch.no_grad():
                outs.append(model(x, layout.positions, c))
        for i, n in enumerate(lens):
            torch.testing.assert_close(outs[0][i, :n], outs[1][i, :n], rtol=1e-5, atol=1e-5)
    tables = paged.block_tables
    assert any(b != a + 1 for t in tables.values() for a, b in zip(t, t[1:])), \
        "the test should exercise non-contiguous block tables"


def test_batched_streams_equal_each_stream_alone():
    """Streams that join and leave between steps decode exactly as they do alone."""
    model = _model(CFG, 2)
    params = [SamplingParams(temperature=0.9, top_k=20, seed=s) for s in (1, 2, 3)]
    prefixes = [_prefix(3 + i, CFG.hidden_size, 10 + i) for i in range(3)]

    alone = []
    for p, pre in zip(params, prefixes):
        rt = ARRuntime(model, num_blocks=32, block_size=4)
        rt.add_sequence(0, pre, [CFG.bos_token_id], p, bias=BIAS)
        alone.append(rt.generate([0], 12)[0])

    rt = ARRuntime(model, num_blocks=32, block_size=4)
    out = {i: [] for i in range(3)}
    rt.add_sequence(0, prefixes[0], [CFG.bos_token_id], params[0], bias=BIAS)
    for step in range(16):
        if step == 3:
            rt.add_sequence(1, prefixes[1], [CFG.bos_token_id], params[1], bias=BIAS)
        if step == 4:
            rt.add_sequence(2, prefixes[2], [CFG.bos_token_id], params[2], bias=BIAS)
        live = [i for i in rt.seqs if len(out[i]) < 12]
        for i, toks in rt.step(live).items():
            out[i] += toks
        for i in live:
            if len(out[i]) == 12:
                rt.free(i)
    assert [out[i] for i in range(3)] == alone
    assert rt.cache.num_free_blocks == 32


def test_greedy_speculative_equals_greedy_plain():
    model, draft = _model(CFG, 3), _model(DRAFT, 4)
    greedy = SamplingParams(temperature=0.0)
    prefix, dprefix = _prefix(4, CFG.hidden_size, 5), _prefix(4, DRAFT.hidden_size, 6)
    plain = ARRuntime(model, num_blocks=32, block_size=8)
    plain.add_sequence(0, prefix, [CFG.bos_token_id], greedy, bias=BIAS)
    spec = ARRuntime(model, draft, num_blocks=32, block_size=8)
    spec.add_sequence(0, prefix, [CFG.bos_token_id], greedy, dprefix, bias=BIAS)
    a = plain.generate([0], 40)[0]
    b = spec.generate([0], 40, speculative=True, num_draft_tokens=4)[0]
    assert a == b
    assert spec.stats["draft_tokens"] > 0
    # Verification forwards replace plain ones: fewer target forwards than tokens.
    assert spec.stats["target_forwards"] < plain.stats["target_forwards"] or \
        spec.acceptance_rate() == 0


def test_speculative_sampling_follows_target_distribution():
    """Chi-square test: tokens emitted by the accept/reject rule follow p, not q."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    first, second = torch.zeros(4), torch.zeros(4)
    n_second = 0
    for _ in range(n):
        d0 = int(torch.multinomial(q[0], 1, generator=gen))
        d1 = int(torch.multinomial(q[1], 1, generator=gen))
        out, accepted = speculative_accept(p, q, [d0, d1], gen)
        first[out[0]] += 1
        if accepted >= 1:
            # Given the first draft token was accepted, the second emitted token ~ p[1].
            second[out[1]] += 1
            n_second += 1

    def chi2(counts, probs, total):
        expected = probs * total
        return float(((counts - expected) ** 2 / expected).sum())

    # 3 degrees of freedom: the 99.9% quantile is 16.27.
    assert chi2(first, p[0], n) < 16.27
    assert chi2(second, p[1], n_second) < 16.27
    # The same statistic against q is huge: the test can tell the two apart.
    assert chi2(first, q[0], n) > 1000


def test_sampling_top_k_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    pk = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (pk[2:] == 0).all() and math.isclose(float(pk.sum()), 1, rel_tol=1e-6)
    pp = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert float(full[0]) < 0.7 < float(full[:2].sum())
    assert (pp[:2] > 0).all() and (pp[2:] == 0).all()
    g = probabilities(logits, SamplingParams(temperature=0.0))
    assert g.tolist() == [1, 0, 0, 0, 0]


def _settings_matrix(seed: int) -> list[SamplingParams]:
    """Four rows that cover greedy, temperature, top-k (also past the vocabulary) and top-p."""
    temps, ks, ps = [0.0, 0.7, 1.3, 0.8], [0, 5, 0, 400], [1.0, 0.9, 0.5, 1.0]
    return [SamplingParams(temperature=temps[i], top_k=ks[(i + seed) % 4],
                           top_p=ps[(i + seed // 4) % 4]) for i in range(4)]


def test_sampling_in_fixed_shapes_draws_what_draw_draws():
    """sample_rows (the sampling a CUDA graph holds) picks, for every row and every setting,
    the token draw() picks from probabilities() with the same uniform draw."""
    vocab, differ, rows, unfiltered = 300, 0, 0, 0
    for seed in range(64):
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)) * 3
        if seed % 2:  # the plan bias's -inf columns, as decoding has them
            logits[:, 256:] = float("-inf")
        params = _settings_matrix(seed)
        gens = [lambda i=i: torch.Generator().manual_seed(1000 * seed + i) for i in range(4)]
        u = torch.tensor([torch.rand((), generator=g(), dtype=torch.float64).item() for g in gens])
        got = sample_rows(logits, u=u, **row_settings(params)).tolist()
        want = [draw(probabilities(logits[i], p), gens[i]()) for i, p in enumerate(params)]
        differ += sum(a != b for a, b in zip(got, want))
        rows += 4
        # Without the filters: for rows that use none, the same tokens; for rows that do,
        # other ones somewhere over the seeds.
        plain = [SamplingParams(temperature=p.temperature) for p in params]
        assert uses_filters(params, vocab) and not uses_filters(plain, vocab)
        settings = row_settings(plain)
        assert sample_rows(logits, u=u, filters=False, **settings).tolist() == \
            sample_rows(logits, u=u, **settings).tolist() == \
            [draw(probabilities(logits[i], p), gens[i]()) for i, p in enumerate(plain)]
        unfiltered += sample_rows(logits, u=u, filters=False, **row_settings(params)).tolist() != got
    assert (differ, rows) == (0, 256)
    assert unfiltered > 0
    # A top-k past the vocabulary filters nothing.
    assert not uses_filters([SamplingParams(top_k=vocab), SamplingParams(top_k=0)], vocab)


def test_a_round_decodes_a_frame_of_tokens_back_to_back_and_draws_what_single_steps_do():
    """decode_round with group=4 takes plain steps on the static path back to back in one
    call (the host waits once), stopping where the earliest row's frame of 4 ends; the tokens
    are the single-step general path's, for rows of different settings, biases and lengths."""
    model = _model(CFG, 8)
    params = _settings_matrix(3)[:3]
    runs, calls = {}, []
    for grouped in (False, True):
        rt = ARRuntime(model, num_blocks=60, block_size=4, static_decode=grouped, max_positions=64)
        for i in range(3):
            rt.add_sequence(i, _prefix(3 + 2 * i, CFG.hidden_size, 40 + i), [CFG.bos_token_id],
                            SamplingParams(params[i].temperature, params[i].top_k,
                                           params[i].top_p, seed=i),
                            bias=BIAS.repeat(4, 1) if i != 1 else None)
        rt.decode_round({0: 1, 1: 1, 2: 1}, group=4)  # the prefills: one token each
        rt.decode_round({0: 1}, group=4)              # row 0 one token further
        want = {0: 14, 1: 15, 2: 15}
        while any(want.values()):
            out = rt.decode_round({s: n for s, n in want.items() if n}, group=4 if grouped else 1)
            if grouped:
                calls.append({s: len(t) for s, t in out.items()})
            for s, toks in out.items():
                want[s] -= len(toks)
        runs[grouped] = [rt.tokens(i) for i in range(3)]
    assert runs[True] == runs[False]
    # Row 0 is 2 tokens into its frame, the others 1: 2 steps end row 0's frame, 1 more the
    # others', and so on; the last call stops at what the rows still want.
    steps = [max(c.values()) for c in calls]
    assert steps == [2, 1, 3, 1, 3, 1, 3, 1], calls
    assert calls[-1] == {1: 1, 2: 1}


def test_blocks_return_to_pool_and_full_pool_is_an_error():
    model = _model(CFG, 5)
    rt = ARRuntime(model, num_blocks=6, block_size=4)
    rt.add_sequence("a", _prefix(8, CFG.hidden_size, 0), [CFG.bos_token_id], SamplingParams(seed=1))
    rt.generate(["a"], 3)
    used = 6 - rt.cache.num_free_blocks
    assert used == math.ceil((8 + 1 + 2) / 4)
    rt.add_sequence("b", _prefix(20, CFG.hidden_size, 1), [CFG.bos_token_id], SamplingParams(seed=2))
    with pytest.raises(CachePoolExhausted, match=r"KV cache pool exhausted: 6 more blocks of 4 "
                                                  r"positions needed, 3 of 6 free"):
        rt.step(["b"])
    rt.free("b")
    rt.free("a")
    assert rt.cache.num_free_blocks == 6


def test_static_decode_equals_the_general_path():
    """The fixed-shape decode step (what CUDA graphs capture) gives the same logits and tokens
    as the general paged path, for a batch of sequences of different lengths."""
    model = _model(CFG, 6)
    runs = {}
    for static in (False, True):
        rt = ARRuntime(model, num_blocks=40, block_size=4, static_decode=static, max_positions=64)
        for i in range(3):
            rt.add_sequence(i, _prefix(3 + 2 * i, CFG.hidden_size, 20 + i), [CFG.bos_token_id],
                            SamplingParams(temperature=0.8, seed=i), bias=BIAS)
        rt.step([0, 1, 2])                      # prefill (general path either way)
        logits = []
        for _ in range(6):
            logits.append(torch.stack([rt.logits(i) for i in range(3)]))
            rt.step([0, 1, 2])
        runs[static] = ([rt.tokens(i) for i in range(3)], logits)
        if static:
            assert set(rt._static) == {3}      # the static runner served the decode steps
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_compiled_decoder_layer_serves_every_layer():
    """The compiled decode step compiles one decoder layer and runs all of them through it
    (each layer's weights and LayerSlot index are inputs, not constants; the cache is written
    outside it), and decodes what the general path decodes."""
    from torch._dynamo.utils import counters

    model = _model(CFG, 7)
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        rt = ARRuntime(model, num_blocks=40, block_size=4, static_decode=compiled, max_positions=64)
        rt.compile_steps = compiled  # CUDA only by default (helios/accel.py)
        for i in range(3):
            rt.add_sequence(i, _prefix(3 + 2 * i, CFG.hidden_size, 30 + i), [CFG.bos_token_id],
                            SamplingParams(temperature=0.8, seed=i), bias=BIAS)
        logits = []
        for _ in range(7):  # the prefill, then decode steps across several 4-position blocks
            rt.step([0, 1, 2])
            logits.append(torch.stack([rt.logits(i) for i in range(3)]))
        runs[compiled] = ([rt.tokens(i) for i in range(3)], logits)
    assert rt._static[3].compiled and CFG.num_hidden_layers == 3
    assert counters["stats"]["unique_graphs"] == 1
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_building_the_static_steps_leaves_no_autograd_graph_in_the_cache():
    """prepare_static runs each step once to compile it (and on CUDA to capture it), outside
    any no_grad of the caller's: the keys it writes must not carry an autograd graph into the
    cache, which would keep every layer's gathered keys and values alive for good."""
    model = _model(CFG, 8)
    assert next(model.parameters()).requires_grad
    rt = ARRuntime(model, num_blocks=40, block_size=4, static_decode=True, max_positions=64)
    rt.compile_steps = True  # the step runs once at build time (CUDA only by default)
    rt.prepare_static([1, 2])
    assert set(rt._static) == {1, 2}
    for pool in (rt.cache.k, rt.cache.v):
        assert not pool.requires_grad and pool.grad_fn is None


def _slot_bias():
    """Three slots over the 48 codes: 0..31, 32..39, 40..47 (regions, then two geometry)."""
    bias = BIAS.repeat(3, 1)
    bias[0, 32:48], bias[1, :32], bias[1, 40:48], bias[2, :40] = -1e9, -1e9, -1e9, -1e9
    return bias


@pytest.mark.parametrize("speculative", [False, True])
def test_slot_bias_keeps_every_token_in_its_slot(speculative):
    """A bias row per slot (helios.schedule.plan_bias): sampled and speculatively accepted
    tokens alike stay in their slot's ids, at a temperature where the model's own logits
    would spread over all 48 codes; greedy speculative decoding still equals plain."""
    model, draft = _model(CFG, 0), _model(DRAFT, 1)
    prefix, dprefix = _prefix(4, CFG.hidden_size, 2), _prefix(4, DRAFT.hidden_size, 2)
    rt = ARRuntime(model, num_blocks=64, block_size=8, draft=draft if speculative else None)
    rt.add_sequence(0, prefix, [CFG.bos_token_id], SamplingParams(temperature=2.0, seed=5),
                    dprefix, bias=_slot_bias())
    toks = rt.generate([0], 30, speculative=speculative, num_draft_tokens=3)[0][:30]
    ranges = [(0, 32), (32, 40), (40, 48)]
    assert all(ranges[i % 3][0] <= t < ranges[i % 3][1] for i, t in enumerate(toks)), toks
    assert len({t for t in toks[::3]}) > 3  # sampled, not pinned: the rows only mask
    greedy = SamplingParams(temperature=0.0, seed=0)
    plain = ARRuntime(model, num_blocks=64, block_size=8)
    plain.add_sequence(0, prefix, [CFG.bos_token_id], greedy, bias=_slot_bias())
    spec = ARRuntime(model, num_blocks=64, block_size=8, draft=draft)
    spec.add_sequence(0, prefix, [CFG.bos_token_id], greedy, dprefix, bias=_slot_bias())
    assert plain.generate([0], 24)[0][:24] == spec.generate([0], 24, speculative=True, num_draft_tokens=3)[0][:24]


def test_plan_bias_of_the_tiny_config():
    """11 rows for the tiny config's 11 slots: 8 region slots allow the 256 codes, the row,
    column and size slots their 32, 32 and 8 bins; the specials never. 14b: one row."""
    from helios.config import get_config
    from helios.schedule import plan_bias

    rows = plan_bias(get_config("tiny"))
    allowed = [np.flatnonzero(r > -1) for r in rows]
    assert len(rows) == 11 and all(a.tolist() == list(range(256)) for a in allowed[:8])
    assert [(a.min(), a.max(), len(a)) for a in allowed[8:]] == \
        [(256, 287, 32), (288, 319, 32), (320, 327, 8)]
    cfg = get_config("14b")
    one = plan_bias(cfg)  # no geometry tokens: plan_vocab_bias's one row
    assert one.shape == (1, cfg.ar_backbone.vocab_size) and one.dtype == np.float32
    assert np.array_equal(one[0], plan_vocab_bias(cfg.ar_backbone).numpy())


def test_fused_projections_give_the_same_logits_and_tokens():
    """q/k/v and gate/up in one matrix each (helios.ar_backbone.fuse_projections): the same
    logits (to float32 rounding) and the same sampled tokens, prefill and decode steps."""
    from helios.ar_backbone import fuse_projections

    model, prefix = _model(CFG, 3), _prefix(6, CFG.hidden_size, 4)

    def run():
        rt = ARRuntime(model, num_blocks=16, block_size=8)
        rt.add_sequence(0, prefix, [CFG.bos_token_id], SamplingParams(seed=5), bias=BIAS)
        first = rt.logits(0)
        rt.generate([0], 12)
        return first, rt.tokens(0)

    logits, tokens = run()
    fused = fuse_projections(model)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.qkv_proj.weight.shape == (CFG.hidden_size + 2 * CFG.num_key_value_heads * CFG.head_dim,
                                          CFG.hidden_size)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    assert mlp.gate_up_proj.weight.shape == (2 * CFG.intermediate_size, CFG.hidden_size)
    fused_logits, fused_tokens = run()
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert fused_tokens == tokens
    assert fuse_projections(model) is model  # already fused: left as it is


def test_the_nucleus_keeps_the_lower_ids_of_tied_tokens_on_every_path():
    """Top-p with equal probabilities at its edge: the nucleus keeps the lower token ids of the
    tied ones, in probabilities() and in sample_rows (the sampling a CUDA graph holds) alike,
    and no draw lands outside it, not even one of exactly 0. bf16 logits tie often; an
    unstable sort kept an arbitrary one of the tied tokens."""
    for vocab in (300, 1000):
        logits = torch.zeros(vocab)
        tied = [7, 50, 120, vocab - 1]
        logits[tied] = 2.0
        p_tied = float(torch.softmax(logits, -1)[7])
        params = SamplingParams(temperature=1.0, top_p=2.5 * p_tied)  # room for 3 of the 4
        probs = probabilities(logits, params)
        assert (probs > 0).nonzero().flatten().tolist() == tied[:3]
        settings = row_settings([params])
        landed = {int(sample_rows(logits[None], u=u[None], **settings))
                  for u in torch.linspace(0, 1, 301, dtype=torch.float64)[:-1]}
        assert landed == set(tied[:3])
        assert int(sample_rows(logits[None], u=torch.zeros(1, dtype=torch.float64),
                               **settings)) == 7
        assert {draw(probs, torch.Generator().manual_seed(s)) for s in range(64)} == set(tied[:3])

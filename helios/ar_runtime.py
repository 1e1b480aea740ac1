"""The AR runtime: many plan-token streams over one paged KV cache, plain or speculative.

A sequence's context is its prefix (the projected prompt embeddings, one position each)
followed by its tokens. The cache holds the keys/values of a leading part of the context;
whatever lies past it is fed at the next forward. So prefill, decode and speculative
verification are the same call, and rows of one batch may be at any of them (in-flight
batching): streams join with ``add_sequence`` and leave with ``free`` between any two steps.

Every sequence samples with its own generator and its own logit bias (TensorRT-LLM's
``embedding_bias``), so its tokens never depend on which other streams share its batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch

from .accel import CompiledOrEager
from .ar_backbone import ARBackbone, use_gemv
from .kv_cache import PagedKVCache, StaticDecodeView, host_to_device
from .sampling import (SamplingParams, draw, probabilities, row_settings, sample_rows,
                       speculative_accept, uses_filters)

# Rows feeding more positions than this are run as their own forward (prefill), so that a
# long prompt does not pad every decode row of the batch to its length.
_MAX_PADDED_NEW = 16

# Inductor's coordinate-descent tuning for the compiled decode step (``_StaticDecode``),
# switched by the entry points from ``Settings.ar_step_tuning``.
_STEP_TUNING = {"on": False}


def use_settings(settings) -> None:
    """The AR's process-wide switches from an entry point's ``helios.settings.Settings``: its
    one-row products by ``helios::gemv`` (``ar_backbone.use_gemv``) and the decode step's
    tuning (``tune_steps``)."""
    use_gemv(settings.ar_gemv)
    tune_steps(settings.ar_step_tuning)


def tune_steps(on: bool) -> None:
    """Compile the AR decode step with Inductor's coordinate-descent tuning or without it (the
    default); takes effect for steps compiled afterwards."""
    _STEP_TUNING["on"] = on


@dataclass
class _Sequence:
    prefix: torch.Tensor               # [P, hidden] prompt embeddings of the target
    draft_prefix: torch.Tensor | None  # [P, draft hidden]
    tokens: list[int]
    params: SamplingParams
    generator: torch.Generator
    # [slots, vocab] added to the logits before sampling: row j to the generated tokens
    # j, j + slots, ... (one row: every token). Plan tokens of a frame come in slots.
    bias: torch.Tensor | None
    first: int = 0                     # len(tokens) when the sequence joined

    @property
    def length(self) -> int:
        return self.prefix.shape[0] + len(self.tokens)


class _StaticDecode:
    """A plain decode step of a fixed batch size in fixed shapes, its sampling included: run
    eagerly, or captured once as a CUDA graph and replayed (the step then costs its GPU time,
    not ~1,000 launches from Python). The sampled tokens stay on the device and feed the next
    step, so several steps run back to back without the host waiting for any of them."""

    @torch.no_grad()
    def __init__(self, model: ARBackbone, cache: PagedKVCache, batch: int, max_blocks: int,
                 capture: bool, compile_step: bool = False):
        # Without autograd: a warm-up step with it wrote keys that carry a graph into the
        # cache, so the cache kept every layer's gathered keys and values alive for a
        # backward pass that never comes (about 36 GiB at 14b for four streams, measured by
        # benchmarks/server_memory.py on an H200).
        dev = cache.k.device
        self.view = StaticDecodeView(cache, batch, max_blocks)
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)
        # The sampling's inputs (sampling.row_settings, one uniform draw and one bias row per
        # row) and its output.
        self.settings = {k: v.to(dev) for k, v in row_settings([SamplingParams()] * batch).items()}
        self.draws = torch.zeros(batch, dtype=torch.float64, device=dev)
        self.bias = torch.zeros(batch, model.config.vocab_size, device=dev)
        self.sampled = torch.zeros(batch, dtype=torch.long, device=dev)
        # Whether any row filters by top-k or top-p (set_rows): the sampling without the
        # filters skips their two sorts of the vocabulary, 0.15 ms of a 14b step on an H200
        # (docs/performance.md).
        self.filters = False
        self.model = model
        self.graphs = {}  # filters -> the step captured with that sampling
        self.logits = None
        self._logits = {}  # filters -> that graph's logits
        self._run = self._forward
        if capture:
            # Warm up on a side stream (compilation, kernel selection, allocator), then
            # capture. The view points at the scratch block meanwhile, so no sequence's keys
            # are touched.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                if compile_step:
                    self._compile()
                for filters in (False, True, False, True):
                    self.filters = filters
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            # One graph a sampling, the forward in both: a second graph of the sampling alone
            # would cost a launch a step. They share one memory pool (never replayed at once;
            # each one's logits stay allocated).
            pool = None
            for filters in (False, True):
                self.filters = filters
                graph = self.graphs[filters] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._logits[filters] = self._step()
                pool = graph.pool()
            self.filters = False
        elif compile_step:
            self._compile()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured step of the rows' sampling (None when the step runs eagerly)."""
        return self.graphs.get(self.filters)

    def _compile(self) -> None:
        """torch.compile the step's decoder layer: its ~60 small kernels (norms in float32,
        RoPE, the paged gather, the masked softmax) fuse into a few around its 7 GEMVs. In a
        CUDA graph each kernel still costs a few microseconds of GPU time, 40 layers x 60 of
        them about as much as the weights' bandwidth floor. One layer is compiled and serves
        all of them (their weights and their ``LayerSlot`` are inputs, not constants): at 14b
        compiling the whole 40-layer step took minutes, and in a Triton stub over 7 minutes.
        The cache writes stay eager (``LayerSlot``). Batch 1 compiles in static shapes, larger
        batches once more in dynamic ones. Falls back to eager if compilation fails.

        Inductor's coordinate-descent tuning (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1,
        ``tune_steps``) tunes each fused kernel's tile sizes, and at batch 1 writes each
        one-row product as a reduction of its own, fused with the RMSNorm before it or the
        SiLU gate and residual around it. That took the 14b step on an H200 from 8.21 to
        7.42 ms while cuBLAS ran the products. With the products in ``helios::gemv`` it tunes
        only the kernels around them and no longer pays: the untuned step was as fast or
        faster in every A/B, and compiles in a fraction of the time (docs/performance.md), so
        it is off unless asked for (to measure it: ``benchmarks/gpu.sh``'s tuning-ab)."""
        self._slots = self.view.layer_slots()
        self._layer = CompiledOrEager(_decoder_layer, "AR decoder layer",
                                      options={"coordinate_descent_tuning": _STEP_TUNING["on"]})
        self._run = self._forward_compiled
        self._run()

    @property
    def compiled(self) -> bool:
        return self._run == self._forward_compiled and self._layer.compiled

    def _forward(self):
        x = self.model.model.embed_tokens(self.ids)[:, None]
        return self.model(x, self.view.positions, self.view)        # [B, 1, vocab]

    def _forward_compiled(self):
        x = self.model.model.embed_tokens(self.ids)[:, None]
        logits = self.model(x, self.view.positions, self.view,
                            run_layer=lambda i, layer, h, cos, sin:
                            self._layer(layer, h, cos, sin, self._slots[i]))
        # The new position's keys and values, eagerly (see LayerSlot), all layers at once.
        self.view.write_layers(self._slots, self.view.write_rows())
        return logits

    def _step(self):
        """The forward, then each row's token drawn (``sample_rows``, with the top-k and top-p
        filters if ``filters``) and fed to the next step."""
        logits = self.logits = self._run()
        self.sampled.copy_(sample_rows(logits[:, 0] + self.bias, u=self.draws,
                                       filters=self.filters, **self.settings))
        self.ids.copy_(self.sampled)
        return logits

    def replay(self) -> None:
        """One captured step, with the sampling the rows need."""
        self.graph.replay()
        self.logits = self._logits[self.filters]

    def set_rows(self, params: list[SamplingParams]) -> None:
        """The rows' sampling settings, for the steps until the next call."""
        for k, v in row_settings(params).items():
            self.settings[k].copy_(host_to_device(v, self.ids.device))
        self.filters = uses_filters(params, self.bias.shape[1])

    def __call__(self, seq_ids: list, token_ids: list[int] | None = None,
                 draws: list[float] | None = None, bias_rows: list | None = None) -> torch.Tensor:
        """One step of these rows at their cache lengths. ``token_ids``: the tokens fed, from
        the host; None feeds what the previous step sampled. ``draws`` and ``bias_rows``
        (a [vocab] tensor or None per row) are this step's sampling inputs. The token sampled
        is in ``sampled``; returns the logits [B, vocab]."""
        dev = self.ids.device
        self.view.load(seq_ids)
        if token_ids is not None:
            self.ids.copy_(host_to_device(token_ids, dev))
        if draws is not None:
            self.draws.copy_(host_to_device(torch.tensor(draws, dtype=torch.float64), dev))
        for row, bias in zip(self.bias, bias_rows or ()):
            row.copy_(bias) if bias is not None else row.zero_()
        if self.graph is not None:
            self.replay()
        else:
            self._step()
        return self.logits[:, 0]


def _decoder_layer(layer, h, cos, sin, slot):
    """The compiled unit of the decode step (``_StaticDecode._compile``)."""
    return layer(h, cos, sin, slot)


class ARRuntime:
    def __init__(self, model: ARBackbone, draft: ARBackbone | None = None, *,
                 num_blocks: int = 256, block_size: int = 16, device=None,
                 static_decode: bool = False, cuda_graphs: bool = False,
                 max_positions: int | None = None, compile_steps: bool | Collection[int] = False):
        """``static_decode``: plain decode steps run in fixed shapes (``StaticDecodeView``);
        with ``cuda_graphs`` (CUDA only) they are captured once per batch size and replayed,
        compiled first with ``compile_steps``: True for every batch size, or the batch sizes
        to compile (the others stay eager inside their graphs). One decoder layer is compiled
        for all of them (about 20 s at 14b): batch 1 in static shapes, any larger batch once
        more in dynamic ones.
        ``max_positions`` bounds a sequence's length on that path (default: the model's)."""
        self.model = model
        self.draft = draft
        p = next(model.parameters())
        # The caches live on ``device``; with --low-vram the weights visit it only while used.
        self.device, self.dtype = torch.device(device or p.device), p.dtype
        self.cache = PagedKVCache.for_model(model.config, num_blocks, block_size, p.dtype,
                                            self.device)
        self.draft_cache = None
        if draft is not None:
            self.draft_cache = PagedKVCache.for_model(draft.config, num_blocks, block_size,
                                                      next(draft.parameters()).dtype, self.device)
        self.seqs: dict[object, _Sequence] = {}
        self.stats = {"draft_tokens": 0, "accepted_tokens": 0, "target_forwards": 0,
                      "draft_forwards": 0}
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.compile_steps = compile_steps if self.device.type == "cuda" else False
        self.static_decode = static_decode or self.cuda_graphs
        max_positions = max_positions or model.config.max_position_embeddings
        self._static_blocks = math.ceil(max_positions / block_size)
        self._static: dict[int, _StaticDecode] = {}
        # Called with (kind, seconds) after every model forward when set; see _forward.
        self.on_forward: Callable[[str, float], None] | None = None

    # ---- streams join and leave --------------------------------------------------------
    def add_sequence(self, seq_id, prefix: torch.Tensor, tokens: list[int],
                     params: SamplingParams, draft_prefix: torch.Tensor | None = None,
                     bias: torch.Tensor | np.ndarray | None = None) -> None:
        """A sequence joins: its prompt ``prefix``, its first ``tokens`` and its logit
        ``bias`` (a row per slot, [slots, vocab], or one row; a tensor or an array)."""
        if seq_id in self.seqs:
            raise KeyError(f"sequence {seq_id!r} already exists")
        if draft_prefix is not None and self.draft is not None:
            draft_prefix = draft_prefix.to(self.device, next(self.draft.parameters()).dtype)
        gen = torch.Generator().manual_seed(params.seed)
        self.seqs[seq_id] = _Sequence(
            prefix.to(self.device, self.dtype), draft_prefix, list(tokens), params, gen,
            None if bias is None else
            torch.as_tensor(bias).float().reshape(-1, bias.shape[-1]).to(self.device),
            len(tokens))
        self.cache.add_sequence(seq_id)
        if self.draft_cache is not None:
            self.draft_cache.add_sequence(seq_id)

    def free(self, seq_id) -> None:
        """Drop a finished or cancelled sequence and return its blocks to the pools."""
        self.seqs.pop(seq_id, None)
        self.cache.free(seq_id)
        if self.draft_cache is not None:
            self.draft_cache.free(seq_id)

    def tokens(self, seq_id) -> list[int]:
        return list(self.seqs[seq_id].tokens)

    # ---- forwards ----------------------------------------------------------------------
    def _start(self, cache, seq_id) -> int:
        """First context position to feed. A forward needs at least one input to produce the
        next token's logits, so a fully cached context re-feeds its last position."""
        seq = self.seqs[seq_id]
        if cache.lengths[seq_id] >= seq.length:
            cache.truncate(seq_id, seq.length - 1)
        return cache.lengths[seq_id]

    def _inputs(self, model: ARBackbone, seq: _Sequence, prefix, start: int, extra: list[int]):
        """Embeddings of the context positions from ``start`` on, where the context is
        prefix + tokens + ``extra`` (draft tokens not yet part of the sequence): [T, hidden]."""
        p = prefix.shape[0]
        ids = (seq.tokens + list(extra))[max(0, start - p):]
        parts = []
        if start < p:
            parts.append(prefix[start:])
        if ids:
            dev = model.model.embed_tokens.weight.device
            parts.append(model.model.embed_tokens(host_to_device(ids, dev)))
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def _timed(self, kind: str, fn, *args, count: int = 1):
        """``fn(*args)``, reported to ``on_forward(kind, seconds)`` when a timer is set (the
        benchmarks set one); the device is synchronised around it only then. ``count``
        forwards of one kind run back to back are reported as that many, each its share."""
        if self.on_forward is None:
            return fn(*args)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *_: None)
        sync(self.device)
        t = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        for _ in range(count):
            self.on_forward(kind, (time.perf_counter() - t) / count)
        return out

    def _forward(self, model, cache, seq_ids, inputs: list[torch.Tensor], keep_last: list[int]):
        """Run ``inputs[i]`` as the next positions of ``seq_ids[i]``; return, per row, the
        float32 logits of its last ``keep_last[i]`` positions. Reported to ``on_forward`` as
        a ``draft_step`` (one new token of the draft), ``verify`` (the target scoring drafted
        tokens), ``plain_step`` (one new token of the target) or ``context`` (anything longer:
        a prefix or a context being fed)."""
        n = max(x.shape[0] for x in inputs)
        if model is self.draft:
            kind = "draft_step" if n == 1 else "context"
        else:
            kind = "verify" if max(keep_last) > 1 else ("plain_step" if n == 1 else "context")
        return self._timed(kind, self._forward_rows, model, cache, seq_ids, inputs, keep_last)

    def _forward_rows(self, model, cache, seq_ids, inputs, keep_last):
        out: list = [None] * len(seq_ids)
        groups: list[list[int]] = []
        short = [i for i, x in enumerate(inputs) if x.shape[0] <= _MAX_PADDED_NEW]
        if short:
            groups.append(short)
        groups += [[i] for i, x in enumerate(inputs) if x.shape[0] > _MAX_PADDED_NEW]
        for rows in groups:
            lens = [inputs[i].shape[0] for i in rows]
            x = inputs[rows[0]].new_zeros(len(rows), max(lens), inputs[rows[0]].shape[-1])
            for j, i in enumerate(rows):
                x[j, :lens[j]] = inputs[i]
            layout = cache.prepare([seq_ids[i] for i in rows], lens)
            logits = model(x, layout.positions, cache)
            for j, i in enumerate(rows):
                out[i] = logits[j, lens[j] - keep_last[i]:lens[j]]
        self.stats["target_forwards" if model is self.model else "draft_forwards"] += 1
        return out

    @staticmethod
    def _biased(logits: torch.Tensor, seq: _Sequence, index: int) -> torch.Tensor:
        """Logits [V] or [n, V] of the tokens at ``index`` .. of ``seq.tokens``, biased."""
        if seq.bias is None:
            return logits
        if logits.dim() == 1:  # one token, every decode step: a row view, no index tensor
            return logits + ARRuntime._bias_row(seq, index)
        rows = (torch.arange(logits.shape[0], device=logits.device) + index - seq.first) \
            % seq.bias.shape[0]
        return logits + seq.bias[rows]

    @staticmethod
    def _bias_row(seq: _Sequence, index: int) -> torch.Tensor | None:
        """The bias row [V] of the token at ``index`` of ``seq.tokens`` (None: no bias): its
        slot in the frame, counted from the sequence's first generated token."""
        return None if seq.bias is None else seq.bias[(index - seq.first) % seq.bias.shape[0]]

    # ---- decoding ----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, seq_id) -> torch.Tensor:
        """Logits of the next token after the whole context (feeds what is not cached)."""
        seq = self.seqs[seq_id]
        x = self._inputs(self.model, seq, seq.prefix, self._start(self.cache, seq_id), [])
        return self._forward(self.model, self.cache, [seq_id], [x], [1])[0][-1]

    def _static_fits(self, seq_ids: list, steps: int = 1) -> bool:
        """Every row feeds exactly its last token (a token id, not a prefix row) and stays
        within the static length for ``steps`` steps."""
        limit = self._static_blocks * self.cache.block_size
        for s in seq_ids:
            seq = self.seqs[s]
            start = self._start(self.cache, s)
            if (start != seq.length - 1 or start < seq.prefix.shape[0]
                    or seq.length + steps - 1 > limit):
                return False
        return True

    def _runner(self, batch: int) -> _StaticDecode:
        runner = self._static.get(batch)
        if runner is None:
            runner = self._static[batch] = _StaticDecode(
                self.model, self.cache, batch, self._static_blocks, self.cuda_graphs,
                self.compile_steps is True or batch in (self.compile_steps or ()))
        return runner

    def static_step(self, batch: int) -> _StaticDecode | None:
        """The built static decode step of this batch size, if one was built (its ``graph``
        and ``compiled`` say how it runs)."""
        return self._static.get(batch)

    def prepare_static(self, batch_sizes) -> None:
        """Build (compile, capture) the static decode step of these batch sizes now rather
        than at the first step that needs one: a server does it before it takes requests."""
        if self.static_decode:
            for b in batch_sizes:
                self._runner(b)

    def _static_step(self, seq_ids: list, ahead: int = 0,
                     draws: list[float] | None = None) -> torch.Tensor:
        """One static step of these rows, each one position further in the cache; returns
        the logits [B, vocab]. ``ahead``: how many tokens the rows sampled on the device that
        their ``tokens`` do not hold yet; the step feeds the last of them (with none, each
        row's last token), and draws with ``draws`` and the bias of the token after them."""
        runner = self._runner(len(seq_ids))
        self.cache.reserve(seq_ids, [1] * len(seq_ids))
        for s in seq_ids:
            self.cache.lengths[s] += 1
        self.stats["target_forwards"] += 1
        seqs = [self.seqs[s] for s in seq_ids]
        bias = [self._bias_row(sq, len(sq.tokens) + ahead) for sq in seqs]
        return runner(seq_ids, None if ahead else [sq.tokens[-1] for sq in seqs], draws, bias)

    def _static_steps(self, seq_ids: list, steps: int) -> dict:
        """``steps`` plain steps of these rows on the static path, sampled on the device: the
        host queues them all and waits once, for the tokens."""
        runner = self._runner(len(seq_ids))
        self.cache.reserve(seq_ids, [steps] * len(seq_ids))  # all the blocks, or none
        seqs = [self.seqs[s] for s in seq_ids]
        runner.set_rows([sq.params for sq in seqs])
        # The draws each row's generator gives its next tokens, in the order draw() takes them.
        draws = [[torch.rand((), generator=sq.generator, dtype=torch.float64).item()
                  for sq in seqs] for _ in range(steps)]
        out = torch.empty(steps, len(seq_ids), dtype=torch.long, device=self.device)

        def run():
            for r in range(steps):
                self._static_step(seq_ids, r, draws[r])
                out[r].copy_(runner.sampled)
            return out.T.tolist()

        tokens = self._timed("plain_step", run, count=steps)
        for sq, toks in zip(seqs, tokens):
            sq.tokens.extend(toks)
        return dict(zip(seq_ids, tokens))

    def step(self, seq_ids: list) -> dict:
        """One plain decode step for every sequence: returns {seq_id: [new token]}."""
        return self._plain_steps(seq_ids, 1)

    @torch.no_grad()
    def _plain_steps(self, seq_ids: list, steps: int) -> dict:
        """Up to ``steps`` plain decode steps for every sequence (all on the static path when
        it fits, else one on the general path): returns {seq_id: new tokens}."""
        if self.static_decode and self._static_fits(seq_ids, steps):
            return self._static_steps(seq_ids, steps)
        inputs = [self._inputs(self.model, self.seqs[s], self.seqs[s].prefix,
                               self._start(self.cache, s), []) for s in seq_ids]
        logits = self._forward(self.model, self.cache, seq_ids, inputs, [1] * len(seq_ids))
        new = {}
        for s, lg in zip(seq_ids, logits):
            seq = self.seqs[s]
            tok = draw(probabilities(self._biased(lg[-1], seq, len(seq.tokens)), seq.params),
                       seq.generator)
            seq.tokens.append(tok)
            new[s] = [tok]
        return new

    @torch.no_grad()
    def speculative_step(self, seq_ids: list, ks: list[int]) -> dict:
        """Draft ``ks[i]`` tokens with the draft model, verify them in one target forward.

        Returns {seq_id: emitted tokens} (between 1 and k+1 tokens per sequence).
        """
        seqs = [self.seqs[s] for s in seq_ids]
        drafts = [[] for _ in seq_ids]
        qs = [[] for _ in seq_ids]
        base = [sq.length for sq in seqs]
        # Draft phase: round r feeds what the draft has not seen and samples draft token r.
        for r in range(max(ks, default=0)):
            rows = [i for i, k in enumerate(ks) if r < k]
            inputs = []
            for i in rows:
                sq = seqs[i]
                start = (self._start(self.draft_cache, seq_ids[i]) if r == 0
                         else self.draft_cache.lengths[seq_ids[i]])
                inputs.append(self._inputs(self.draft, sq, sq.draft_prefix, start, drafts[i]))
            logits = self._forward(self.draft, self.draft_cache, [seq_ids[i] for i in rows],
                                   inputs, [1] * len(rows))
            for i, lg in zip(rows, logits):
                q = probabilities(self._biased(lg[-1], seqs[i], len(seqs[i].tokens) + r),
                                  seqs[i].params)
                qs[i].append(q)
                drafts[i].append(draw(q, seqs[i].generator))
        # Verify: one target forward over the uncached context and all draft tokens.
        inputs = [self._inputs(self.model, sq, sq.prefix, self._start(self.cache, s), d)
                  for s, sq, d in zip(seq_ids, seqs, drafts)]
        logits = self._forward(self.model, self.cache, seq_ids, inputs, [k + 1 for k in ks])
        out = {}
        for i, s in enumerate(seq_ids):
            sq = seqs[i]
            p = probabilities(self._biased(logits[i], sq, len(sq.tokens)), sq.params)  # [k+1, V]
            q = torch.stack(qs[i]) if qs[i] else p[:0]
            emitted, accepted = speculative_accept(p, q, drafts[i], sq.generator)
            sq.tokens.extend(emitted)
            self.stats["draft_tokens"] += ks[i]
            self.stats["accepted_tokens"] += accepted
            # The caches hold the rejected draft tokens too: roll them back.
            self.cache.truncate(s, base[i] + accepted)
            self.draft_cache.truncate(s, min(self.draft_cache.lengths[s], base[i] + accepted))
            out[s] = emitted
        return out

    def decode_round(self, remaining: dict, speculative: dict | bool = False,
                     num_draft_tokens: int = 4, group: int = 1) -> dict:
        """One round for every sequence in ``remaining`` ({seq_id: tokens still wanted}):
        a speculative step for those that asked for it, plain steps for the others, never
        emitting more than a sequence still wants. Returns {seq_id: emitted tokens}.

        ``group``: the plain rows take as many steps together as none of them passes the end
        of its current group of ``group`` tokens (counted from its first generated token: a
        latent frame's plan tokens) when those steps run back to back on the static path,
        one step otherwise. A frame's tokens then cost one wait of the host, not one each.

        This is the unit of in-flight batching: the server calls it once per iteration over
        whatever streams are live, the in-process pipeline over its one stream.
        """
        if not isinstance(speculative, dict):
            speculative = {s: speculative for s in remaining}
        spec, plain = [], []
        for s, n in remaining.items():
            drafts = min(num_draft_tokens, n - 1)
            if speculative.get(s) and self.draft is not None and drafts > 0:
                spec.append((s, drafts))
            else:
                plain.append(s)
        out = {}
        if spec:
            out.update(self.speculative_step([s for s, _ in spec], [d for _, d in spec]))
        if plain:
            steps = min(min(remaining[s], group - (len(self.seqs[s].tokens) - self.seqs[s].first)
                            % group) for s in plain)
            out.update(self._plain_steps(plain, steps))
        return out

    @torch.no_grad()
    def generate(self, seq_ids: list, n: int, speculative: bool = False,
                 num_draft_tokens: int = 4) -> dict:
        """Append ``n`` sampled tokens to every sequence; returns {seq_id: those tokens}."""
        if speculative and self.draft is None:
            raise ValueError("speculative decoding needs a draft model")
        done = {s: [] for s in seq_ids}
        while True:
            remaining = {s: n - len(done[s]) for s in seq_ids if len(done[s]) < n}
            if not remaining:
                return done
            for s, toks in self.decode_round(remaining, speculative, num_draft_tokens).items():
                done[s].extend(toks)

    def acceptance_rate(self) -> float:
        d = self.stats["draft_tokens"]
        return self.stats["accepted_tokens"] / d if d else float("nan")

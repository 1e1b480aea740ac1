"""In-flight batching of AR requests over one ``ARRuntime`` (TensorRT-LLM's batch manager, in
PyTorch).

A caller turns each request into an ``ARJob`` and hands it to ``ARScheduler.submit``; one
scheduler thread owns the ``ARRuntime`` and, every iteration, admits waiting jobs, drops
stopped or cancelled ones (their KV blocks go back to the pool), and runs one ``decode_round``
over all live sequences, streaming each job's new tokens out through its ``emit`` callback.
Admission follows TensorRT-LLM's ``guaranteed_no_evict`` policy: a job is admitted only when
the pool can hold it to its end alongside every job already running, so a running stream
never runs out of blocks. The Triton ``ar_backbone`` model is one caller
(``helios_triton``); nothing here knows Triton.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .ar_runtime import ARRuntime
from .sampling import SamplingParams

log = logging.getLogger("helios.ar_scheduler")


@dataclass
class ARJob:
    request_id: str
    prefix: torch.Tensor               # [P, hidden]
    draft_prefix: torch.Tensor | None  # [P, draft hidden]
    tokens: list[int]                  # context after the prefix
    num_new: int                       # tokens to generate
    params: SamplingParams
    bias: torch.Tensor | np.ndarray | None
    speculative: bool
    emit: Callable[[list[int]], None]           # new tokens (streaming)
    finish: Callable[[str | None], None]        # end of the job: None or an error message
    cancelled: Callable[[], bool] = lambda: False
    held: Callable[[], bool] = lambda: False    # true: skip this job's rounds for now
    remaining: int = field(init=False)
    seq_id: int = field(init=False, default=-1)

    def __post_init__(self):
        self.remaining = self.num_new

    @property
    def max_length(self) -> int:
        return self.prefix.shape[0] + len(self.tokens) + self.num_new


class ARScheduler:
    def __init__(self, runtime: ARRuntime, num_draft_tokens: int = 4,
                 on_iteration: Callable[[dict], None] | None = None, group: int = 1):
        """``group``: plan tokens per latent frame (``ARRuntime.decode_round``)."""
        self.runtime = runtime
        self.num_draft_tokens = num_draft_tokens
        self.group = group
        self.on_iteration = on_iteration
        self._cond = threading.Condition()
        self._queue: collections.deque[ARJob] = collections.deque()
        self._live: dict[int, ARJob] = {}
        self._stops: set[str] = set()
        self._reserved = 0
        self._ids = itertools.count()
        self._closed = False
        self.iterations = 0
        self._thread = threading.Thread(target=self._loop, name="ar-scheduler", daemon=True)
        self._thread.start()

    # ---- called from Triton's execute thread -------------------------------------------
    def blocks_for(self, job: ARJob) -> int:
        """Blocks of the target pool the job can use at most (the draft pool mirrors it)."""
        extra = self.num_draft_tokens + 1 if job.speculative and self.runtime.draft is not None else 0
        return math.ceil((job.max_length + extra) / self.runtime.cache.block_size)

    def submit(self, job: ARJob) -> None:
        need, total = self.blocks_for(job), self.runtime.cache.num_blocks
        if need > total:
            job.finish(f"request needs {need} KV cache blocks of "
                       f"{self.runtime.cache.block_size} tokens, the pool has {total} "
                       f"(max_tokens_in_paged_kv_cache)")
            return
        with self._cond:
            if self._closed:
                job.finish("the AR scheduler is shutting down")
                return
            self._queue.append(job)
            self._cond.notify()

    def stop(self, request_id: str) -> None:
        """TensorRT-LLM's stop request: end the job with this request id, keeping its tokens."""
        with self._cond:
            self._stops.add(request_id)
            self._cond.notify()

    def wake(self) -> None:
        """A held job may run again: look at once rather than at the next poll."""
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        cache = self.runtime.cache
        with self._cond:
            return {"kv_blocks_total": cache.num_blocks, "kv_blocks_free": cache.num_free_blocks,
                    "kv_blocks_used": cache.num_blocks - cache.num_free_blocks,
                    "active_sequences": len(self._live), "queued_requests": len(self._queue),
                    "iterations": self.iterations,
                    "draft_tokens": self.runtime.stats["draft_tokens"],
                    "accepted_draft_tokens": self.runtime.stats["accepted_tokens"]}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for job in list(self._queue) + list(self._live.values()):
            job.finish("the AR scheduler is shutting down")

    # ---- the scheduler thread ----------------------------------------------------------
    def _end(self, job: ARJob, error: str | None) -> None:
        if job.seq_id in self._live:
            del self._live[job.seq_id]
            self._reserved -= self.blocks_for(job)
            self.runtime.free(job.seq_id)
        try:
            job.finish(error)
        except Exception:  # a client that went away must not stop the other streams
            log.exception("finishing request %s failed", job.request_id)

    def _admit(self) -> None:
        total = self.runtime.cache.num_blocks
        while self._queue and self._reserved + self.blocks_for(self._queue[0]) <= total:
            job = self._queue.popleft()
            job.seq_id = next(self._ids)
            self.runtime.add_sequence(job.seq_id, job.prefix, job.tokens, job.params,
                                      job.draft_prefix, job.bias)
            self._reserved += self.blocks_for(job)
            self._live[job.seq_id] = job

    def _loop(self) -> None:
        dev = self.runtime.device
        if dev.type == "cuda":  # high priority: the refiner's kernels share the GPU (MPS)
            with torch.cuda.stream(torch.cuda.Stream(dev, priority=-1)):
                self._rounds()
        else:
            self._rounds()

    def _rounds(self) -> None:
        while True:
            self._round()
            if self.on_iteration is not None:  # after every pass: frees show up at once
                self.on_iteration(self.stats())
            if self._closed:
                return

    def _round(self) -> None:
        """Admit, drop stopped or cancelled jobs, run one decode round."""
        with self._cond:
            while not self._closed and not self._queue and not self._live:
                self._cond.wait()
            if self._closed:
                return
            stops, self._stops = self._stops, set()
            for job in [j for j in self._queue if j.request_id in stops]:
                self._queue.remove(job)
                self._end(job, None)
            self._admit()
            live = list(self._live.values())
        for job in live:
            if job.request_id in stops or job.cancelled():
                log.info("request %s stopped after %d of %d tokens", job.request_id,
                         job.num_new - job.remaining, job.num_new)
                self._end(job, None)
        live = [j for j in live if j.seq_id in self._live and not j.held()]
        if not live:
            if self._live:  # every job held: wait for a wake (or poll)
                with self._cond:
                    self._cond.wait(0.01)
            return
        try:
            out = self.runtime.decode_round({j.seq_id: j.remaining for j in live},
                                            {j.seq_id: j.speculative for j in live},
                                            self.num_draft_tokens, self.group)
        except Exception as e:  # never leave a stream hanging: fail the batch, go on
            log.exception("decode round failed")
            for job in live:
                self._end(job, f"AR decoding failed: {e}")
            return
        self.iterations += 1
        for job in live:
            job.remaining -= len(out[job.seq_id])
        if self.on_iteration is not None:  # before the tokens go out: a client that has a
            self.on_iteration(self.stats())  # token sees the metrics of the round that made it
        for job in live:
            toks = out[job.seq_id]
            try:
                job.emit(toks)
            except Exception:
                log.exception("sending tokens of request %s failed", job.request_id)
                self._end(job, None)
                continue
            if job.remaining <= 0:
                self._end(job, None)



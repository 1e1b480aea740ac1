"""KV caches of the AR runtime: a paged pool (production) and a contiguous one (reference).

Both expose the same two calls to the model: ``prepare(seq_ids, num_new)`` before a forward
(it reserves room for ``num_new[i]`` new positions of each sequence and remembers the batch)
and ``attend(layer, q, k, v)`` inside it (it stores the new keys/values and runs causal
attention over everything the sequence has cached).

The paged cache follows vLLM / TensorRT-LLM: one pool of fixed-size blocks shared by every
sequence, a block table per sequence, blocks allocated as a sequence grows and returned when it
finishes, is cancelled or is rolled back (speculative decoding). Rows of a batch may have
different numbers of new tokens; the shorter ones are padded on the right and masked.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import CachePoolExhausted

# Decode attention changes shape every step (one more key). cuDNN's SDPA plans a new graph for
# every new shape: measured on an H100, 11 ms of CPU per call against 5 us of GPU work. The
# memory-efficient kernel takes the mask with no per-shape setup.
_DECODE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _masked_attention(q, k, v, mask):
    """q [B,H,T,D]; k/v [B,KVH,L,D]; mask [B,T,L] bool (True = may attend)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query attention: query head h reads KV head h // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    with sdpa_kernel(_DECODE_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


def host_to_device(values, device) -> torch.Tensor:
    """Host-known values (a list of ints, or a CPU tensor) on ``device``, copied without
    waiting for the device: ``torch.tensor(values, device=...)`` synchronises with the GPU,
    and an eager forward that waits for the GPU between its launches runs at the speed of its
    launches. On CUDA the values go through pinned memory: from pageable memory the driver
    may wait for the stream before it copies."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _BatchLayout:
    """Where the new tokens of one forward go, and what each query may read."""

    def __init__(self, starts: list[int], num_new: list[int], device):
        self.starts = starts          # cached length of each row before this forward
        self.num_new = num_new
        t = max(num_new)
        total = [s + n for s, n in zip(starts, num_new)]
        self.total_len = max(total)
        j = torch.arange(t, device=device)
        start = host_to_device(starts, device)
        n = host_to_device(num_new, device)
        self.valid = j[None, :] < n[:, None]                      # [B, T]
        # The flat index (row * T + position) of every valid query position, in row-major
        # order: what indexing with ``valid`` selects, without the synchronisation a boolean
        # index costs (the device counts the rows, the host waits), twice in every layer.
        self.valid_index = host_to_device(                             # [n_valid]
            [i * t + k for i, m in enumerate(num_new) for k in range(m)], device)
        self.positions = start[:, None] + j[None, :]              # [B, T]
        key_pos = torch.arange(self.total_len, device=device)
        mask = key_pos[None, None, :] <= self.positions[:, :, None]
        # Padded query rows attend to position 0 only, so that they produce no NaN.
        mask &= self.valid[:, :, None] | (key_pos == 0)[None, None, :]
        self.mask = mask                                          # [B, T, L]


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype=torch.float32, device="cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One block more than the pool hands out: a scratch block that fixed-shape decoding
        # (CUDA-graph capture, padding) may write to without touching any sequence's data.
        self.scratch_block = num_blocks
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks: list[int] = list(range(num_blocks))
        self.block_tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}
        self._batch = None

    @classmethod
    def for_model(cls, cfg, num_blocks: int, block_size: int, dtype, device):
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, num_blocks,
                   block_size, dtype, device)

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def add_sequence(self, seq_id) -> None:
        if seq_id in self.block_tables:
            raise KeyError(f"sequence {seq_id!r} is already in the cache")
        self.block_tables[seq_id] = []
        self.lengths[seq_id] = 0

    def free(self, seq_id) -> None:
        """Return every block of the sequence to the pool (finished or cancelled)."""
        blocks = self.block_tables.pop(seq_id, [])
        self.lengths.pop(seq_id, None)
        self.free_blocks.extend(reversed(blocks))

    def truncate(self, seq_id, length: int) -> None:
        """Forget positions >= length (rejected speculative tokens) and free unused blocks."""
        if length > self.lengths[seq_id]:
            raise ValueError("truncate can only shorten a sequence")
        self.lengths[seq_id] = length
        table = self.block_tables[seq_id]
        keep = math.ceil(length / self.block_size)
        while len(table) > keep:
            self.free_blocks.append(table.pop())

    def blocks_needed(self, seq_id, num_new: int) -> int:
        need = math.ceil((self.lengths[seq_id] + num_new) / self.block_size)
        return max(0, need - len(self.block_tables[seq_id]))

    # ---- one forward -------------------------------------------------------------------
    def reserve(self, seq_ids: list, num_new: list[int]) -> None:
        """Allocate the blocks for ``num_new`` more positions of each sequence, all or none."""
        needed = sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, num_new))
        if needed > len(self.free_blocks):
            raise CachePoolExhausted(
                f"KV cache pool exhausted: {needed} more blocks of {self.block_size} positions "
                f"needed, {len(self.free_blocks)} of {self.num_blocks} free")
        for s, n in zip(seq_ids, num_new):
            for _ in range(self.blocks_needed(s, n)):
                self.block_tables[s].append(self.free_blocks.pop())

    def prepare(self, seq_ids: list, num_new: list[int]) -> _BatchLayout:
        self.reserve(seq_ids, num_new)
        device = self.k.device
        layout = _BatchLayout([self.lengths[s] for s in seq_ids], list(num_new), device)
        # Slot of every (row, position) of the padded key range, through the block tables.
        bs = self.block_size
        tables = torch.zeros(len(seq_ids), math.ceil(layout.total_len / bs), dtype=torch.long)
        for i, s in enumerate(seq_ids):
            t = self.block_tables[s]
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        tables = host_to_device(tables, device)
        pos = torch.arange(layout.total_len, device=device)
        layout.read_slots = tables[:, pos // bs] * bs + pos % bs            # [B, L]
        write = layout.read_slots.gather(1, layout.positions.clamp(max=layout.total_len - 1))
        layout.write_slots = write.reshape(-1).index_select(0, layout.valid_index)  # [n_valid]
        for s, n in zip(seq_ids, num_new):
            self.lengths[s] += n
        self._batch = layout
        return layout

    def attend(self, layer: int, q, k, v):
        b = self._batch
        # k/v: [B, KVH, T, D] -> the valid positions' rows [n_valid, KVH, D] -> the pool's slots
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            pool.index_copy_(0, b.write_slots,
                             new.transpose(1, 2).flatten(0, 1).index_select(0, b.valid_index))
        keys = self.k[layer][b.read_slots].transpose(1, 2)                 # [B, KVH, L, D]
        values = self.v[layer][b.read_slots].transpose(1, 2)
        return _masked_attention(q, keys, values, b.mask)


class StaticDecodeView:
    """One new position per row over a PagedKVCache, in shapes that never change.

    The block table is padded to ``max_blocks`` per row and the keys of all
    ``max_blocks * block_size`` positions are gathered and masked, so one decode step has the
    same shapes whatever the sequences' lengths: it can be captured once as a CUDA graph and
    replayed with new values in ``block_table`` and ``positions``. Padding entries point at the
    scratch block.
    """

    def __init__(self, cache: PagedKVCache, batch: int, max_blocks: int):
        dev = cache.k.device
        self.cache = cache
        self.max_blocks = max_blocks
        self.block_table = torch.full((batch, max_blocks), cache.scratch_block, dtype=torch.long,
                                      device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        bs = cache.block_size
        self._key_pos = torch.arange(max_blocks * bs, device=dev)
        self._key_block, self._key_offset = self._key_pos // bs, self._key_pos % bs
        # Each layer's first row in the flat pools (``_pool``), for ``write_layers``.
        self._layer_rows = torch.arange(cache.k.shape[0], device=dev) * cache.k.shape[1]

    def load(self, seq_ids: list) -> None:
        """Point the static buffers at these sequences (their new position = length - 1)."""
        c = self.cache
        table = torch.full((len(seq_ids), self.max_blocks), c.scratch_block, dtype=torch.long)
        for i, s in enumerate(seq_ids):
            blocks = c.block_tables[s]
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        pos = torch.tensor([[c.lengths[s] - 1] for s in seq_ids], dtype=torch.long)
        # Through pinned memory: steps run back to back, and the host loads the next one's
        # tables while the GPU still runs the last.
        self.block_table.copy_(host_to_device(table, self.block_table.device))
        self.positions.copy_(host_to_device(pos, self.positions.device))

    def layer_slots(self) -> list[LayerSlot]:
        return [LayerSlot(self, i) for i in range(self.cache.k.shape[0])]

    def attend(self, layer, q, k, v):
        self.write(layer, k, v)
        return self.read(layer, q)

    def _pool(self):
        """The cache as one flat [layers x rows] pool of each of K and V, so that a layer's
        index is data (an int, or a 0-d long tensor from ``LayerSlot``), not code."""
        c = self.cache
        return c.k.view(-1, *c.k.shape[2:]), c.v.view(-1, *c.v.shape[2:]), c.k.shape[1]

    def write(self, layer, k, v) -> None:
        """The new position's keys and values [B, KVH, 1, D] into the cache."""
        pool_k, pool_v, rows = self._pool()
        rows_new = layer * rows + self.write_rows()
        pool_k.index_copy_(0, rows_new, k[:, :, 0])
        pool_v.index_copy_(0, rows_new, v[:, :, 0])

    def write_layers(self, slots: list["LayerSlot"], write_rows) -> None:
        """Every layer's new keys and values (held by ``slots``, every layer's in order, after
        a step's forward) into the cache: one copy each for K and V over all the layers'
        rows. A copy per layer and pool was 80 launches of a few microseconds each in a 14b
        step; the one write took 0.46-0.57 ms off its captured replay on an H200
        (docs/performance.md)."""
        pool_k, pool_v, _ = self._pool()
        dest = (self._layer_rows[:, None] + write_rows[None, :]).reshape(-1)   # [layers x B]
        for pool, new in ((pool_k, [s.k for s in slots]), (pool_v, [s.v for s in slots])):
            pool.index_copy_(0, dest, torch.stack(new)[:, :, :, 0].flatten(0, 1))
        for s in slots:
            s.k = s.v = None

    def write_rows(self):
        """Each row's new position as a row of one layer's cache, [B]."""
        bs = self.cache.block_size
        pos = self.positions[:, 0]
        return self.block_table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs  # [B]

    def read(self, layer, q, k=None, v=None):
        """Attention of one query per row over its cached positions. With ``k``/``v`` the
        new position's keys and values come from them instead of the cache (not written yet)."""
        pool_k, pool_v, rows = self._pool()
        bs = self.cache.block_size
        read = layer * rows + self.block_table[:, self._key_block] * bs + self._key_offset  # [B, L]
        keys, values = pool_k[read], pool_v[read]                                      # [B, L, KVH, D]
        if k is not None:
            new = (self._key_pos[None, :] == self.positions)[..., None, None]
            keys = torch.where(new, k.transpose(1, 2), keys)
            values = torch.where(new, v.transpose(1, 2), values)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        mask = self._key_pos[None, :] <= self.positions                                 # [B, L]
        # One fused attention call, each KV head serving its group of query heads without
        # repeating it, in the cache's dtype with float32 scores inside the kernel. Against
        # the float32 products it replaced (float32 copies of keys and values, two batched
        # matmuls and a masked softmax): 12.6 against 21.9 us a layer at 512 positions, 14b
        # on an H200, compiled (benchmarks/fusions.py).
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :],
                                              enable_gqa=True)


class LayerSlot:
    """One layer's handle on a ``StaticDecodeView``, holding the layer's index as a tensor.
    A decoder layer compiled once then serves all of them: the int index the layer passes
    (its own ``layer_idx``) is ignored, so it is never baked into the compiled code. The
    compiled layer only reads the cache: the new keys and values are kept here and written
    by ``StaticDecodeView.write_layers`` outside it (a compiled graph that mutated the cache,
    one of its inputs, made the H100 decode step slower than eager: 17.4 ms against 14.8)."""

    def __init__(self, view: StaticDecodeView, layer: int):
        self.view = view
        self.index = torch.tensor(layer, dtype=torch.long, device=view.positions.device)
        self.k = self.v = None

    def attend(self, _layer: int, q, k, v):
        self.k, self.v = k, v
        return self.view.read(self.index, q, k, v)


class ContiguousKVCache:
    """One [max_len] buffer per sequence slot: the simple reference for the paged cache."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seqs: int,
                 max_len: int, dtype=torch.float32, device="cpu"):
        shape = (num_layers, max_seqs, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.slots: dict[object, int] = {}
        self.lengths: dict[object, int] = {}
        self._free_slots = list(range(max_seqs))[::-1]
        self._batch = None

    @classmethod
    def for_model(cls, cfg, max_seqs: int, max_len: int, dtype, device):
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_seqs,
                   max_len, dtype, device)

    def add_sequence(self, seq_id) -> None:
        self.slots[seq_id] = self._free_slots.pop()
        self.lengths[seq_id] = 0

    def free(self, seq_id) -> None:
        self._free_slots.append(self.slots.pop(seq_id))
        self.lengths.pop(seq_id)

    def truncate(self, seq_id, length: int) -> None:
        self.lengths[seq_id] = length

    def prepare(self, seq_ids: list, num_new: list[int]) -> _BatchLayout:
        for s, n in zip(seq_ids, num_new):
            if self.lengths[s] + n > self.max_len:
                raise CachePoolExhausted(f"sequence {s!r} exceeds {self.max_len} positions")
        layout = _BatchLayout([self.lengths[s] for s in seq_ids], list(num_new), self.k.device)
        layout.rows = [self.slots[s] for s in seq_ids]
        for s, n in zip(seq_ids, num_new):
            self.lengths[s] += n
        self._batch = layout
        return layout

    def attend(self, layer: int, q, k, v):
        b = self._batch
        for i, row in enumerate(b.rows):
            start, n = b.starts[i], b.num_new[i]
            self.k[layer, row, start:start + n] = k[i, :, :n].transpose(0, 1)
            self.v[layer, row, start:start + n] = v[i, :, :n].transpose(0, 1)
        keys = self.k[layer, b.rows, :b.total_len].transpose(1, 2)
        values = self.v[layer, b.rows, :b.total_len].transpose(1, 2)
        return _masked_attention(q, keys, values, b.mask)

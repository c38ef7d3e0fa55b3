"""StaticSinkWindowLayer: selkv's quantized sink + window cache with a fixed capacity, for captured decoding.

The same policy and the same quantized middle store as :class:`QuantizedSinkWindowLayer` (16-bit sink and
window, every token between them quantized once, in blocks of ``block_length``, into a
:class:`~selkv.middle.QuantizedMiddle`), laid out so that
a one-token decode step has fixed shapes and no host synchronization, as transformers'
``StaticCache`` does for the full cache: ``torch.compile`` traces it and a CUDA graph replays it.

- Capacity: ``max_cache_len`` positions (left padding included). Every tensor is allocated once,
  at the first update, when batch size, dtype and device are known.
- Lengths live on the device: ``lengths`` int32 ``[4]`` = (num_sink, num_stored, num_recent,
  recent_start) and ``cumulative_length`` (positions seen, int64).
- The window is a ring of ``window_length + block_length`` slots: the ``i``-th oldest window token
  sits at slot ``(recent_start + i) % ring``. Attention does not depend on the order of keys (RoPE
  is already applied), so the ring is read in place.
- Eviction inside the captured step: when the ring is full, the step quantizes its oldest block, writes it
  to the middle rows ``[num_stored, num_stored + block)`` and advances ``num_stored`` (and
  ``recent_start``) past it. Whether a step commits is known on the host without a sync: the host keeps
  a copy of the lengths (``host_lengths``) and :meth:`plan_step` advances it by the same rule
  (:func:`step_lengths`) before each step, so a captured step has two fixed-shape variants (with and
  without the commit) and quantizes each block once. A step nobody planned (a model compiled by hand)
  quantizes the ring's oldest block at every step, as it cannot know, and writes it past ``num_stored``
  when it does not commit: rows past ``num_stored`` are never read, and the middle has a spare block for
  them.
- The sink has one spare slot: a step whose token does not go to the sink writes it there.

Prefill (more than one token) and steps without selkv's attention run eagerly, with host lengths;
they return what :class:`QuantizedSinkWindowLayer` returns.

Past the capacity (``max_cache_len`` rounded up to whole blocks; a one-token step can also fill the
ring's last slot, one position more than a prefill) a prefill raises, and so does a one-token step on
the CPU, where reading the lengths costs nothing. A compiled step, or one on a GPU, cannot stop without
a host sync: it keeps decoding with the middle full, drops the window's oldest token and counts it in
``dropped`` (``SelectiveCache.dropped_tokens``).
"""

from __future__ import annotations

import torch

from ..errors import CapacityError, SpecError
from ..middle import MiddleLayout, QuantizedMiddle
from ..storage import DecodeStorage
from .base import SelectiveLayer


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def step_lengths(
    num_sink, num_stored, num_recent, start, *, sink_capacity, ring, block, middle_capacity, as_int, may_commit=True
):
    """One token's step of the lengths: ``(to_sink, commit, drop, new_lengths)``, each 0 or 1 but the lengths.

    The one rule, for device tensors (the step itself, ``as_int`` a cast to int32) and for host integers
    (:meth:`StaticSinkWindowLayer.plan_step`, ``as_int=int``). The sink takes the sequence's first tokens;
    the ring's oldest block moves to the middle (commit) when the ring is full and the middle has room
    (and ``may_commit``); otherwise a full ring overflows and its oldest token is dropped.
    """
    to_sink = as_int((num_sink < sink_capacity) & (num_stored + num_recent == 0))
    num_recent_after = num_recent + 1 - to_sink
    commit = as_int((num_recent_after >= ring) & (num_stored < middle_capacity)) if may_commit else 0
    drop = as_int(num_recent_after - commit * block > ring)
    new_lengths = (
        num_sink + to_sink,
        num_stored + commit * block,
        num_recent_after - commit * block - drop,
        (start + commit * block + drop) % ring,
    )
    return to_sink, commit, drop, new_lengths


class StaticSinkWindowLayer(SelectiveLayer):
    """:class:`QuantizedSinkWindowLayer`'s policy and store with a fixed capacity of ``max_cache_len`` positions and
    device lengths. Takes the quantized layer's arguments (sink, window, :class:`MiddleLayout`) and
    ``max_cache_len``."""

    retains_evicted = True
    supports_fused_decode = True

    def __init__(self, num_sink_tokens: int, window_length: int, layout: MiddleLayout, *, max_cache_len: int):
        if max_cache_len < 1:
            raise SpecError(f"max_cache_len must be >= 1, got {max_cache_len}")
        super().__init__(num_sink_tokens, window_length, layout.block_length, middle=QuantizedMiddle(layout))
        self.max_cache_len = max_cache_len

    @property
    def layout(self) -> MiddleLayout:
        return self.middle.layout

    @property
    def is_compileable(self) -> bool:
        # One-token steps have fixed shapes only when selkv's attention reads the storage in place.
        return self.fused_decode

    def _reset_counts(self) -> None:
        self.sink_keys = self.sink_values = None
        self.recent_keys = self.recent_values = None
        self.lengths = None  # int32 [4]: num_sink, num_stored, num_recent, recent_start
        self.host_lengths = None  # the same on the host while known without a sync, else None
        self.commit_plan = None  # the next one-token step commits a block (bool), or None: not planned
        self.cumulative_length = None  # int64 []: positions seen
        self.dropped = None  # int64 []: tokens dropped past the capacity
        self.is_initialized = False

    # Host views of the device lengths (each one synchronizes: accounting and eager steps only).
    @property
    def num_sink(self) -> int:
        return int(self.lengths[0]) if self.is_initialized else 0

    @property
    def num_stored(self) -> int:
        return int(self.lengths[1]) if self.is_initialized else 0

    @property
    def num_recent(self) -> int:
        return int(self.lengths[2]) if self.is_initialized else 0

    @property
    def ring_length(self) -> int:
        return self.window_length + self.block_length

    @property
    def middle_capacity(self) -> int:
        """Middle tokens the capacity can need: positions past the sink and the window, in whole blocks."""
        tokens = max(self.max_cache_len - self.sink_capacity - self.window_length, 0)
        return -(-tokens // self.block_length) * self.block_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch_size, num_heads, _, head_dim = key_states.shape
        self.batch_size, self.num_key_value_heads, self.head_dim = batch_size, num_heads, head_dim
        value_dim = value_states.shape[-1]
        sink_shape = (batch_size, num_heads, self.sink_capacity + 1, head_dim)  # + the spare slot
        self.sink_keys = key_states.new_zeros(sink_shape)
        self.sink_values = value_states.new_zeros(sink_shape[:-1] + (value_dim,))
        ring_shape = (batch_size, num_heads, self.ring_length, head_dim)
        self.recent_keys = key_states.new_zeros(ring_shape)
        self.recent_values = value_states.new_zeros(ring_shape[:-1] + (value_dim,))
        self.middle.set_head(key_states)
        self.middle.allocate(key_states, self.middle_capacity + self.block_length)  # + the spare block
        self.lengths = torch.zeros(4, dtype=torch.int32, device=self.device)
        self.host_lengths = (0, 0, 0, 0)
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        self.dropped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.is_initialized = True
        # Fixed addresses: a CUDA graph replays reads and in-place writes of these tensors.
        if not _is_compiling():
            for tensor in (*self._all_tensors().values(), self.lengths, self.cumulative_length, self.dropped):
                torch._dynamo.mark_static_address(tensor)

    # ---------------------------------------------------------------- updates

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``[batch, kv_heads, q_len, head_dim]``; return what attention reads.

        A one-token step with selkv's attention runs on the device (capturable) and returns the ring;
        attention reads :meth:`decode_storage`. Anything else runs eagerly (see the module docstring).
        """
        if self.is_initialized and key_states.shape[0] != self.batch_size:
            self._start_another_batch(key_states.shape[0])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.storage_step = self.fused_decode and key_states.shape[-2] == 1
        if self.storage_step:
            self._decode_step(key_states, value_states)
            return self.recent_keys, self.recent_values
        return self._eager_update(key_states, value_states)

    def _rule(self, as_int) -> dict:
        return dict(
            sink_capacity=self.sink_capacity,
            ring=self.ring_length,
            block=self.block_length,
            middle_capacity=self.middle_capacity,
            as_int=as_int,
        )

    def plan_step(self) -> None:
        """Before a one-token step, on the host: whether it commits a block (``commit_plan``), from the host
        copy of the lengths, which it advances. Without a host copy the step is left unplanned (``None``)."""
        if not self.is_initialized or self.host_lengths is None:
            self.commit_plan = None
            return
        _, commit, _, self.host_lengths = step_lengths(*self.host_lengths, **self._rule(int))
        self.commit_plan = bool(commit)

    def set_lengths(self, num_sink: int, num_stored: int, num_recent: int, recent_start: int, seen: int) -> None:
        """Set the lengths (device and host copy) and the positions seen: a cache filled or rewound by hand."""
        self._set_lengths((num_sink, num_stored, num_recent, recent_start))
        self.cumulative_length.fill_(seen)

    def _set_lengths(self, lengths: tuple[int, int, int, int]) -> None:
        """The device lengths and their host copy, from the host; no step is planned yet."""
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        self.host_lengths, self.commit_plan = lengths, None

    def _decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """One token, fixed shapes, device lengths only; the window's oldest block is quantized only when the
        step commits it (or at every step when the step was not planned, see the module docstring)."""
        if not _is_compiling() and self.commit_plan is None:
            self.plan_step()  # an eager step plans itself
        plan, self.commit_plan = self.commit_plan, None
        if plan is None:  # compiled by hand, unplanned: the host copy no longer follows the device
            self.host_lengths = None
        block, ring, sink_capacity = self.block_length, self.ring_length, self.sink_capacity
        num_sink, num_stored, num_recent, start = self.lengths.unbind()
        # A plan without a commit leaves it out of the step (a wrong plan then drops a token, counted in
        # ``dropped``; it never corrupts the middle).
        rule = self._rule(lambda t: t.to(torch.int32))
        to_sink, _, drop, new_lengths = step_lengths(
            num_sink, num_stored, num_recent, start, **rule, may_commit=plan is not False
        )
        if self.device.type == "cpu" and not _is_compiling() and bool(drop):
            self.host_lengths = tuple(self.lengths.tolist())  # this step does not happen
            raise self._capacity_error(int(self.cumulative_length) + 1, sink_capacity + self.middle_capacity + ring)
        sink_slot = torch.where(to_sink.bool(), num_sink, sink_capacity).view(1).long()
        self.sink_keys.index_copy_(2, sink_slot, key_states)
        self.sink_values.index_copy_(2, sink_slot, value_states)
        # The next ring slot (a token that went to the sink leaves an unread copy there).
        ring_slot = torch.remainder(start + num_recent, ring).view(1).long()
        self.recent_keys.index_copy_(2, ring_slot, key_states)
        self.recent_values.index_copy_(2, ring_slot, value_states)
        if plan is not False:
            # Quantize the ring's oldest block and write it after the stored middle; only a commit keeps it
            # (unplanned steps write rows past num_stored, which nothing reads).
            oldest = torch.remainder(start + torch.arange(block, device=self.device), ring)
            self.middle.write(
                self.recent_keys.index_select(2, oldest), self.recent_values.index_select(2, oldest), num_stored
            )
        self.lengths.copy_(torch.stack(new_lengths))
        self.cumulative_length.add_(1)
        self.dropped.add_(drop)

    def _eager_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of tokens with host lengths (prefill); the same result as the dynamic layer's update."""
        num_sink, num_stored, num_recent, start = self.lengths.tolist()
        query_length = key_states.shape[-2]
        to_sink = min(max(self.sink_capacity - num_sink, 0), query_length) if num_recent + num_stored == 0 else 0
        if to_sink:
            self.sink_keys[:, :, num_sink : num_sink + to_sink] = key_states[:, :, :to_sink]
            self.sink_values[:, :, num_sink : num_sink + to_sink] = value_states[:, :, :to_sink]
            num_sink += to_sink
        new_keys, new_values = key_states[:, :, to_sink:], value_states[:, :, to_sink:]
        order = torch.remainder(start + torch.arange(num_recent, device=self.device), self.ring_length)
        window_keys = torch.cat([self.recent_keys.index_select(2, order), new_keys], dim=-2)
        window_values = torch.cat([self.recent_values.index_select(2, order), new_values], dim=-2)
        overflow = window_keys.shape[-2] - self.window_length
        evict = (overflow // self.block_length) * self.block_length if overflow >= self.block_length else 0
        if num_stored + evict > self.middle_capacity:
            held = self.sink_capacity + self.middle_capacity + self.window_length + self.block_length - 1
            raise self._capacity_error(int(self.cumulative_length) + query_length, held)
        if evict:
            self.middle.write(window_keys[:, :, :evict], window_values[:, :, :evict], num_stored)
        kept = window_keys.shape[-2] - evict
        self.recent_keys[:, :, :kept] = window_keys[:, :, evict:]
        self.recent_values[:, :, :kept] = window_values[:, :, evict:]
        self._set_lengths((num_sink, num_stored + evict, kept, 0))
        self.cumulative_length.add_(query_length)
        if evict <= num_recent:  # the window still holds every token of this call, exact
            exact_keys, exact_values = window_keys[:, :, evict:], window_values[:, :, evict:]
            num_read_back = num_stored + evict
        else:  # this call's own tokens were evicted too: return them as given, read back only older ones
            exact_keys, exact_values = new_keys, new_values
            num_read_back = num_stored + num_recent
        keys, values = [self.sink_keys[:, :, :num_sink]], [self.sink_values[:, :, :num_sink]]
        if num_read_back:
            middle_keys, middle_values = self._read_stored(num_read_back)
            keys.append(middle_keys.to(self.dtype))
            values.append(middle_values.to(self.dtype))
        keys.append(exact_keys)
        values.append(exact_values)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def _capacity_error(self, needed: int, held: int) -> CapacityError:
        return CapacityError(
            f"the static cache built for max_cache_len={self.max_cache_len} holds up to {held} positions (whole "
            f"blocks); this update needs {needed}: build it with a larger max_cache_len"
        )

    def decode_storage(self) -> DecodeStorage:
        """The storage with device lengths; the integer lengths are the capacities."""
        return self._storage(self.sink_capacity, self.middle_capacity, self.ring_length, self.lengths)

    # ------------------------------------------------------- transformers API

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): a fixed ``max_cache_len`` for captured one-token steps (positions from 0,
        as ``StaticCache``), else what the eager update returns (positions seen plus this call's)."""
        if self.fused_decode and query_length == 1:
            return self.max_cache_len, 0
        seen = int(self.cumulative_length) if self.is_initialized else 0
        return seen + query_length, 0

    def get_seq_length(self) -> torch.Tensor | int:
        """Positions seen: a device tensor once initialized (read it without a host sync in a captured step)."""
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token and the batch's padding: the layer then serves the next batch as a new one would.

        The tensors (and their addresses, which a CUDA graph holds) stay while the next batch fits them:
        the same batch size and sink room. Another batch size, or another left padding (which changes
        the sink's room), allocates them anew at its first update.
        """
        self.left_padding = 0
        self.row_padding = None
        if self.is_initialized:
            with torch.inference_mode():  # the tensors may be inference tensors (made under inference_mode)
                self.lengths.zero_()
                self.cumulative_length.zero_()
                self.dropped.zero_()
            self.host_lengths, self.commit_plan = (0, 0, 0, 0), None

    def set_left_padding(self, left_padding: int, row_padding: torch.Tensor | None = None) -> None:
        if (
            self.is_initialized
            and not self.has_tokens()
            and self.sink_keys.shape[-2] != (self.num_sink_tokens + left_padding + 1)
        ):
            self._reset_counts()  # another sink room: the tensors are allocated anew at the next update
        super().set_left_padding(left_padding, row_padding)

    def has_tokens(self) -> bool:
        return self.is_initialized and int(self.cumulative_length) > 0  # a host sync: only before a prefill

    def _start_another_batch(self, batch_size: int) -> None:
        """A batch of another size: allowed on an empty (new or reset) cache, which reallocates for it."""
        if self.has_tokens():
            raise CapacityError(
                f"this static cache holds a batch of {self.batch_size} sequences; a batch of {batch_size} needs "
                "cache.reset() first (or another cache)"
            )
        self._reset_counts()

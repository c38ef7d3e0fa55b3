"""SelectiveLayer: one layer's sink + window storage and the eviction policy.

Per layer, per batch row and KV head, the cache holds, in token order::

    [ sink: first S tokens, 16-bit ][ middle: subclass-defined ][ window: last W..W+block-1 tokens, 16-bit ]

New tokens fill the sink first (the first S tokens of the sequence), then the
window. Whenever the window holds at least ``W + block`` tokens, its oldest
tokens leave it in whole blocks of ``block`` tokens and are handed to
:meth:`_store_evicted`: the quantized layer stores them once, the eviction baseline
drops them. Blocks amortize the shift of the window buffer and give per-channel
key groups (KIVI) their ``block`` tokens.

What one ``update`` returns (the keys/values attention reads) is the cache as
earlier calls left it, plus this call's tokens exact: tokens evicted during
this call that were already cached are read back as the middle stores them
(the eviction baseline, which stores nothing, returns its whole previous
window); tokens of this call are always returned as given, even those evicted
at once (a long prompt attends to itself exactly and is compressed before the
next call). For a one-token decode step of the quantized layer this is exactly
the stored cache, which is what the fused kernel reads.

Memory: every buffer is sized to what it holds. The window buffer grows in
pages of ``window_page_length`` tokens as tokens arrive and is cut back after
an eviction, so a long chunk leaves no oversized buffer behind; the quantized
middle store bounds its spare room the same way (``QuantizedMiddle._grow``).
``nbytes`` counts the storage really held.

The middle: a layer that keeps evicted tokens quantized owns a
:class:`~selkv.middle.QuantizedMiddle` (``self.middle``, by composition); this
class reads it back, counts its bytes, reorders its batch and hands it to
attention (:meth:`_storage`). Layers without one (the eviction baseline, or a
subclass with its own middle) override the ``_middle`` hooks below.

Left padding: a batch whose rows are left-padded to the same length calls
:meth:`set_left_padding` first; the sink then holds ``S + max_padding``
positions, so every row's sink holds its first S real tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..errors import UnsupportedInputError
from ..middle import QuantizedMiddle
from ..storage import DecodeStorage

# Sink and window positions allocated at the first update (the default sink, and window + block, fit in it).
INITIAL_CAPACITY = 256
# What SelectiveLayer.nbytes() counts, under kv_bytes' names (selkv.cache.LAYER_BYTE_KEYS adds full16).
BYTE_KEYS = ("bytes_16bit", "bytes_codes", "bytes_key_codes", "bytes_value_codes", "bytes_scales", "allocated")


class SelectiveLayer(CacheLayerMixin):
    """Base class of selkv's cache layers. Subclasses define the middle region: a
    :class:`~selkv.middle.QuantizedMiddle` handed to ``__init__``, or their own ``_middle`` hooks.

    Tensors are ``[batch_size, num_key_value_heads, seq_len, head_dim]``.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    # Whether tokens that leave the window stay visible to attention (quantized) or are gone (evicted).
    retains_evicted = True
    # Whether selkv's fused decode kernel can read this layer's storage directly.
    supports_fused_decode = False
    # Whether rows may be left-padded (padding positions must stay addressable by the attention mask).
    supports_left_padding = True
    # Whether the last update asks selkv's attention to refuse a left-padded mask (layers that cannot
    # mask padding set it on the first chunk; the cache then hands the layer to attention).
    checks_padding = False
    # The window buffer grows and shrinks in pages of this many tokens: at most a page of spare room
    # (a few KiB per layer), and a decode step reallocates the buffer only every page of tokens.
    window_page_length = 8

    def __init__(
        self, num_sink_tokens: int, window_length: int, block_length: int = 1, middle: QuantizedMiddle | None = None
    ):
        super().__init__()
        self.middle = middle
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.block_length = block_length
        self.left_padding = 0
        self.row_padding = None  # [batch_size] int32: left padding of each row, when known
        # Set by the cache when the model's attention is selkv's: one-token decode steps then return
        # the window only, and the attention function reads the storage itself (decode_storage).
        self.fused_decode = False
        # Whether the last update was such a step (the cache then publishes this layer's storage).
        self.storage_step = False
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.sink_keys = self.sink_values = None
        self.recent_keys = self.recent_values = None
        self.num_sink = 0  # filled sink positions
        self.num_recent = 0  # filled window positions
        self.num_evicted = 0  # tokens that have left the window so far
        self.cumulative_length = 0  # positions seen
        self.is_initialized = False

    # ----------------------------------------------------------------- set-up

    @property
    def sink_capacity(self) -> int:
        return self.num_sink_tokens + self.left_padding

    def set_left_padding(self, left_padding: int, row_padding: torch.Tensor | None = None) -> None:
        """Reserve room so that each row's sink holds its first S real tokens (call before the first update).

        ``left_padding`` is the batch's largest left padding; ``row_padding`` ``[batch_size]`` each row's.
        """
        if self.has_tokens():
            raise RuntimeError("set_left_padding must be called before the first update of the cache")
        if left_padding and not self.supports_left_padding:
            raise UnsupportedInputError(
                f"{type(self).__name__} does not support left-padded batches (its kept tokens are not contiguous "
                "positions, which transformers' padding mask assumes); run rows one at a time"
            )
        self.left_padding = int(left_padding)
        self.row_padding = None if row_padding is None else row_padding.to(torch.int32)

    def has_tokens(self) -> bool:
        """Whether an update has stored tokens since the layer was made or reset."""
        return self.is_initialized

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch_size, num_heads, _, head_dim = key_states.shape
        self.batch_size, self.num_key_value_heads, self.head_dim = batch_size, num_heads, head_dim
        # A long sink or window is not preallocated (window=100000 would take gigabytes before the tenth
        # token): each buffer starts at INITIAL_CAPACITY positions (or the first chunk) and grows as tokens arrive.
        first = max(key_states.shape[-2], INITIAL_CAPACITY)
        sink_shape = (batch_size, num_heads, min(self.sink_capacity, first), head_dim)
        self.sink_keys = key_states.new_zeros(sink_shape)
        self.sink_values = value_states.new_zeros(sink_shape[:-1] + value_states.shape[-1:])
        # The window buffer starts empty and grows with what arrives (``_append_recent``).
        window_shape = (batch_size, num_heads, 0, head_dim)
        self.recent_keys = key_states.new_zeros(window_shape)
        self.recent_values = value_states.new_zeros(window_shape[:-1] + value_states.shape[-1:])
        if self.middle is not None:
            self.middle.set_head(key_states)
        self.is_initialized = True

    # ---------------------------------------------------------------- updates

    def _plan(self, query_length: int) -> tuple[int, int, int]:
        """For ``query_length`` new tokens: (tokens into the sink, window tokens before, tokens evicted)."""
        to_sink = min(max(self.sink_capacity - self.num_sink, 0), query_length)
        if self.num_recent or self.num_evicted:  # the sink only takes the sequence's first tokens
            to_sink = 0
        total = self.num_recent + query_length - to_sink
        overflow = total - self.window_length
        evict = (overflow // self.block_length) * self.block_length if overflow >= self.block_length else 0
        return to_sink, self.num_recent, evict

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``[batch, kv_heads, q_len, head_dim]``; return what attention
        reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        query_length = key_states.shape[-2]
        to_sink, num_old, evict = self._plan(query_length)
        self.cumulative_length += query_length

        if to_sink:
            end = self.num_sink + to_sink
            if end > self.sink_keys.shape[-2]:  # a long sink: grow it to what it will hold
                grow = min(self.sink_capacity, max(end, 2 * self.sink_keys.shape[-2])) - self.sink_keys.shape[-2]
                self.sink_keys = torch.cat([self.sink_keys, self.sink_keys.new_zeros(self._shape(grow))], dim=-2)
                self.sink_values = torch.cat(
                    [self.sink_values, self.sink_values.new_zeros(self._shape(grow, self.sink_values.shape[-1]))],
                    dim=-2,
                )
            self.sink_keys[:, :, self.num_sink : end] = key_states[:, :, :to_sink]
            self.sink_values[:, :, self.num_sink : end] = value_states[:, :, :to_sink]
            self.num_sink = end
        new_keys, new_values = key_states[:, :, to_sink:], value_states[:, :, to_sink:]

        self._append_recent(new_keys, new_values)
        if not self.retains_evicted:
            # Nothing evicted can be read back: this call reads the sink and the whole window as earlier
            # calls left it, plus its own tokens (the window holds exactly these now), before evicting.
            sink, window = slice(0, self.num_sink), slice(0, self.num_recent)
            returned = (
                torch.cat([self.sink_keys[:, :, sink], self.recent_keys[:, :, window]], dim=-2),
                torch.cat([self.sink_values[:, :, sink], self.recent_values[:, :, window]], dim=-2),
            )
        stored_before = self.num_stored
        if evict:
            self._store_evicted(self.recent_keys[:, :, :evict], self.recent_values[:, :, :evict])
            self.num_evicted += evict
            self._shift_recent(evict)

        self.storage_step = self.fused_decode and query_length == 1 and not to_sink
        if not self.retains_evicted:
            return returned
        if self.storage_step:
            # selkv's attention reads sink, middle and window from storage (decode_storage): nothing to assemble.
            return self.recent_keys[:, :, : self.num_recent], self.recent_values[:, :, : self.num_recent]
        if evict <= num_old:  # the window still holds every token of this call, exact
            exact_keys = self.recent_keys[:, :, : self.num_recent]
            exact_values = self.recent_values[:, :, : self.num_recent]
            num_read_back = self.num_stored
        else:  # this call's own tokens were evicted too: return them as given, read back only older ones
            exact_keys, exact_values = new_keys, new_values
            num_read_back = stored_before + num_old
        return self._assemble(num_read_back, exact_keys, exact_values)

    def _assemble(
        self, num_read_back: int, exact_keys: torch.Tensor, exact_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink + the first ``num_read_back`` middle tokens (dequantized) + ``exact_*``, along the sequence.

        One buffer per output: the middle is dequantized straight into its slice (no concatenation
        pass over the whole sequence, which a decode step would pay again every step).
        """
        num_sink, num_exact = self.num_sink, exact_keys.shape[-2]
        middle_end = num_sink + num_read_back
        keys = exact_keys.new_empty(self._shape(middle_end + num_exact))
        values = exact_values.new_empty(self._shape(middle_end + num_exact, exact_values.shape[-1]))
        keys[:, :, :num_sink] = self.sink_keys[:, :, :num_sink]
        values[:, :, :num_sink] = self.sink_values[:, :, :num_sink]
        if num_read_back:
            self._read_stored(num_read_back, keys[:, :, num_sink:middle_end], values[:, :, num_sink:middle_end])
        keys[:, :, middle_end:] = exact_keys
        values[:, :, middle_end:] = exact_values
        return keys, values

    def _window_page(self, num_tokens: int) -> int:
        """Growth unit of the window buffer at ``num_tokens`` tokens: ``window_page_length``, or about 1/32
        of the tokens for long windows (so a window of thousands of tokens is not copied every 8 steps)."""
        page = self.window_page_length
        return max(page, num_tokens // 32 // page * page)

    def _window_capacity(self, num_tokens: int) -> int:
        """Window buffer length for ``num_tokens`` tokens: whole pages."""
        page = self._window_page(num_tokens)
        return -(-num_tokens // page) * page

    def _resize_recent(self, capacity: int) -> None:
        """Move the window's tokens into buffers of ``capacity`` tokens (the old buffers are freed)."""
        keys = self.recent_keys.new_zeros(self._shape(capacity))
        values = self.recent_values.new_zeros(self._shape(capacity, self.recent_values.shape[-1]))
        keys[:, :, : self.num_recent] = self.recent_keys[:, :, : self.num_recent]
        values[:, :, : self.num_recent] = self.recent_values[:, :, : self.num_recent]
        self.recent_keys, self.recent_values = keys, values

    def _append_recent(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        num_new = keys.shape[-2]
        end = self.num_recent + num_new
        if end > self.recent_keys.shape[-2]:  # grow by whole pages (a long chunk: once, to fit it)
            self._resize_recent(self._window_capacity(end))
        self.recent_keys[:, :, self.num_recent : end] = keys
        self.recent_values[:, :, self.num_recent : end] = values
        self.num_recent = end

    def _shift_recent(self, count: int) -> None:
        """Drop the window's oldest ``count`` tokens (already handed to ``_store_evicted``)."""
        keep = self.num_recent - count
        fitted = self._window_capacity(keep)
        if self.recent_keys.shape[-2] > fitted + self._window_page(keep):
            # More than a page spare (an eviction of a block, or a long chunk): move the kept tokens into a
            # fitted buffer, so the buffer never stays larger than what it holds. Within a page of the fit
            # (evictions shorter than a page), shift in place rather than reallocate every step.
            self.recent_keys = self.recent_keys[:, :, count : self.num_recent]
            self.recent_values = self.recent_values[:, :, count : self.num_recent]
            self.num_recent = keep
            self._resize_recent(fitted)
            return
        if keep:
            self.recent_keys[:, :, :keep] = self.recent_keys[:, :, count : self.num_recent].clone()
            self.recent_values[:, :, :keep] = self.recent_values[:, :, count : self.num_recent].clone()
        self.num_recent = keep

    def _shape(self, length: int, last: int | None = None) -> tuple[int, int, int, int]:
        return (self.batch_size, self.num_key_value_heads, length, last or self.head_dim)

    # ---------------------------------------------------------------- the middle

    @property
    def num_stored(self) -> int:
        """Evicted tokens the middle still holds (and attention still reads)."""
        return 0

    def _store_evicted(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the oldest window tokens ``[batch, kv_heads, n, head_dim]`` (n a multiple of ``block_length``) that
        leave the window: a layer with a middle stores them; by default they are dropped (the eviction baseline)."""

    def _read_stored(
        self, count: int, out_keys: torch.Tensor | None = None, out_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` stored middle tokens in the cache's dtype, written into ``out_*`` when given."""
        if self.middle is None:
            raise NotImplementedError
        return self.middle.read(count, self.dtype, out_keys, out_values)

    def _middle_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the middle store, by name, for byte counts."""
        return {} if self.middle is None else self.middle.named_tensors()

    def _middle_used(self) -> dict[str, int]:
        """Bytes of the middle store that hold tokens (excluding spare capacity), under ``kv_bytes``' names:
        ``bytes_codes`` (``bytes_key_codes`` + ``bytes_value_codes``), ``bytes_scales``."""
        return {} if self.middle is None else self.middle.used_bytes(self.num_stored)

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors this layer shares with the cache's other layers (the key and value rotations): kv_bytes counts
        each storage once (keys and values with the same rotation share one)."""
        return [] if self.middle is None else self.middle.rotations()

    def _storage(self, num_sink: int, num_stored: int, num_recent: int, lengths=None) -> DecodeStorage:
        """The storage as selkv's decode attention reads it (a layer with a quantized middle)."""
        middle = self.middle
        return DecodeStorage(
            self.sink_keys,
            self.sink_values,
            middle.tensors,
            self.recent_keys,
            self.recent_values,
            num_sink,
            num_stored,
            num_recent,
            middle.layout,
            row_padding=self.row_padding,
            lengths=lengths,
            key_rotation=middle.key_rotation,
            key_rotation_signs=middle.key_rotation_signs,
            value_rotation=middle.value_rotation,
            value_rotation_signs=middle.value_rotation_signs,
        )

    # ------------------------------------------------------- transformers API

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what the next ``update`` of ``query_length`` tokens returns."""
        if self.retains_evicted:
            return self.cumulative_length + query_length, 0
        # The sink, the whole window as it stands and this call's tokens (see ``update``).
        kv_length = self.num_sink + self.num_recent + query_length
        # The returned tokens end with this call's tokens, which sit at the last positions: place the mask
        # there. Every earlier token then lies before every query, so the causal mask shows them all.
        return kv_length, self.cumulative_length + query_length - kv_length

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget every token and the batch's padding: the layer is then as if new (the next batch may differ)."""
        self._reset_counts()
        self._reset_middle()
        self.left_padding = 0
        self.row_padding = None

    def _reset_middle(self) -> None:
        if self.middle is not None:
            self.middle.clear()

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "sink_keys": self.sink_keys,
            "sink_values": self.sink_values,
            "recent_keys": self.recent_keys,
            "recent_values": self.recent_values,
        }
        tensors.update(self._middle_tensors())
        return {name: t for name, t in tensors.items() if t is not None}

    def _map_batch(self, fn) -> None:
        for name in ("sink_keys", "sink_values", "recent_keys", "recent_values"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.middle is not None:
            self.middle.map_batch(fn)
        if self.row_padding is not None:
            self.row_padding = fn(self.row_padding)
        if self.is_initialized:
            self.batch_size = self.sink_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedInputError(
            f"{type(self).__name__} cannot crop: evicted tokens are quantized or dropped and cannot be restored "
            "(assisted/speculative generation needs a croppable cache such as 'full'; to go back to an earlier "
            "state, take cache.snapshot() then and cache.restore() it)"
        )

    # ------------------------------------------------------------- accounting

    def nbytes(self) -> dict[str, int]:
        """Bytes held, from the tensors themselves.

        ``bytes_16bit`` (sink + window), ``bytes_codes`` (``bytes_key_codes`` + ``bytes_value_codes``)
        and ``bytes_scales`` count the filled part; ``allocated`` counts the storage of every tensor the layer holds,
        each storage once (spare window and middle capacity included): the memory really held. The names are
        ``kv_bytes``' own.
        """
        counted = dict.fromkeys(BYTE_KEYS, 0)
        if not self.is_initialized:
            return counted
        per_token = self.batch_size * self.num_key_value_heads * (self.head_dim + self.recent_values.shape[-1])
        used16 = (self.num_sink + self.num_recent) * per_token * self.sink_keys.element_size()
        tensors = list(self._all_tensors().values())
        if self.row_padding is not None:
            tensors.append(self.row_padding)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        counted.update(self._middle_used(), bytes_16bit=used16, allocated=sum(storages.values()))
        return counted

"""SelectiveCache: a transformers ``Cache`` whose full-attention layers are selkv layers."""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from .layers.base import SelectiveLayer
from .layers.static import StaticSinkWindowLayer
from .middle import QuantizedMiddle
from .shapes import _text_config
from .storage import ATTENTION_NAME, publish, take_published
from .upstream import attention_implementation


class SelectiveCache(Cache):
    """A ``Cache`` whose full-attention layers are selkv layers, built from a ``drop`` or ``quant`` spec.

    It only holds ``layers`` and routes by ``layer_idx``; the spec builds the layers (``spec.cache_layers``)
    and the policy lives in the layer classes. With ``max_cache_len`` (``quant`` specs only) the layers are
    :class:`StaticSinkWindowLayer`: a fixed capacity of that many positions, and one-token steps that
    ``torch.compile`` and CUDA graphs capture (``is_compileable``, as transformers' ``StaticCache``) when the
    model's attention is ``"selkv"``. Sliding-window layers of hybrid models (Gemma 2/3, Mistral with a window)
    keep transformers' ``DynamicSlidingWindowLayer``: they hold at most ``sliding_window`` tokens in 16 bits.

    ``layers``: one cache layer per decoder layer (``make_cache`` builds them from a spec).
    ``fused_decode``: whether one-token steps hand their storage to selkv's attention instead of dequantizing
    (only right when the model's attention is ``"selkv"``); ``None`` decides from the attention ``config``
    records.
    """

    def __init__(self, layers: list, config, fused_decode: bool | None = None):
        if not isinstance(layers, (list, tuple)):
            raise TypeError(
                f"SelectiveCache takes its cache layers (spec.cache_layers(config)); for a spec use "
                f"make_cache({layers!r}, config)"
            )
        super().__init__(layers=list(layers))
        # With selkv's attention, one-token decode steps read the compressed storage directly.
        if fused_decode is None:
            fused_decode = attention_implementation(_text_config(config)) == ATTENTION_NAME
        self.enable_fused_decode(fused_decode)

    def enable_fused_decode(self, enabled: bool = True) -> None:
        """Let one-token decode steps skip dequantization (selkv's attention then reads storage itself)."""
        for layer in self._selkv_layers():
            layer.fused_decode = enabled and layer.supports_fused_decode

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # Hand the layer over to selkv's attention (by layer_idx) when attention must read more than the keys
        # and values: a one-token step's storage, read in place, or a first chunk's mask to check for padding.
        layer = self.layers[layer_idx]
        if getattr(layer, "storage_step", False) or getattr(layer, "checks_padding", False):
            publish(layer_idx, layer)
        else:
            take_published(layer_idx)
        return keys, values

    def plan_decode_step(self) -> None:
        """Before a compiled one-token step: each static layer decides on the host, without a sync, whether
        the step commits a block to the middle (:meth:`StaticSinkWindowLayer.plan_step`), so that the step
        quantizes only when it does. :func:`~selkv.compile_decode_step` calls it before every step."""
        for layer in self._selkv_layers():
            if isinstance(layer, StaticSinkWindowLayer):
                layer.plan_step()

    @property
    def dropped_tokens(self) -> int:
        """Tokens a static cache's compiled or GPU decode steps dropped past its capacity (0 when none;
        a host sync). Such steps cannot stop, so they keep decoding as a sliding window and count here."""
        return max(
            (int(layer.dropped) for layer in self._selkv_layers() if getattr(layer, "dropped", None) is not None),
            default=0,
        )

    def _selkv_layers(self) -> list[SelectiveLayer]:
        """The full-attention layers (sliding-window layers are transformers' own)."""
        return [layer for layer in self.layers if isinstance(layer, SelectiveLayer)]

    def set_left_padding(self, attention_mask: torch.Tensor) -> None:
        """Reserve sink room for left padding, from the first forward's ``attention_mask``.

        2D ``[batch_size, seq_len]`` (1 = token), or the 4D ``[batch_size, 1, q_len, kv_len]`` mask that
        ``generate`` builds itself for compileable caches (True or 0.0 = attended; its last query row
        sees every real token of the prompt).
        """
        if attention_mask is None or attention_mask.dim() not in (2, 4):
            return
        if attention_mask.dim() == 4:
            last_row = attention_mask[:, 0, -1]
            attention_mask = last_row if last_row.dtype == torch.bool else last_row == 0
        row_padding = (attention_mask.int().cumsum(-1) == 0).sum(-1)
        for layer in self._selkv_layers():
            layer.set_left_padding(int(row_padding.max()), row_padding)

    def crop(self, tokens_to_remove: int) -> None:
        layers = self._selkv_layers()
        (layers[0] if layers else super()).crop(tokens_to_remove)

    # ------------------------------------------------------- snapshot / restore

    def snapshot(self) -> CacheSnapshot:
        """A copy of every layer's state (tensors cloned): :meth:`restore` brings the cache back to it.

        What ``crop`` cannot do for a compressed cache: prefill a shared context once, then answer
        several questions against it, restoring the context's cache before each (kvpress's protocol).
        A snapshot holds as much memory as the cache; it may be restored any number of times.
        Static caches (``max_cache_len``) refuse with ``NotImplementedError``.
        """
        for layer in self.layers:
            if isinstance(layer, StaticSinkWindowLayer):
                raise NotImplementedError(
                    f"snapshot() does not support a static cache ({type(layer).__name__}, built with "
                    "max_cache_len); build the cache without max_cache_len to snapshot and restore it"
                )
        return CacheSnapshot(self, [_copy_state(layer.__dict__) for layer in self.layers])

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Bring the cache back to what :meth:`snapshot` saw (the snapshot stays usable for another restore)."""
        if not isinstance(snapshot, CacheSnapshot):
            raise TypeError(f"restore() takes what this cache's snapshot() returned, not {type(snapshot).__name__}")
        if snapshot.cache_id != id(self) or len(snapshot.states) != len(self.layers):
            raise ValueError("this snapshot was taken of another cache; restore it into the cache it came from")
        for layer_idx, (layer, state) in enumerate(zip(self.layers, snapshot.states, strict=True)):
            layer.__dict__.clear()
            layer.__dict__.update(_copy_state(state))
            take_published(layer_idx)  # a decode step's storage published before the restore is stale

    @contextlib.contextmanager
    def checkpoint(self):
        """``with cache.checkpoint(): ...``: whatever the block adds to the cache is undone when it ends."""
        saved = self.snapshot()
        try:
            yield saved
        finally:
            self.restore(saved)


def _copy_state(state: dict) -> dict:
    """``state`` (a layer's ``__dict__``) with every tensor cloned, lists and dicts copied, other values as they are.

    Cache layers write into their buffers in place (the window shifts, the middle store fills its spare
    room), so a snapshot must own its tensors, and a restore must not hand the snapshot's own to the layer.
    The middle store clones itself (keeping the key rotation, which every layer shares, by reference).
    """

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, QuantizedMiddle):
            return value.clone()
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        return value

    return {name: copy(value) for name, value in state.items()}


class CacheSnapshot:
    """What :meth:`SelectiveCache.snapshot` returns: each layer's state at that moment, and its token count."""

    def __init__(self, cache: SelectiveCache, states: list[dict]):
        self.cache_id = id(cache)
        self.states = states
        self.tokens = int(cache.get_seq_length()) if cache.layers else 0

    def __repr__(self) -> str:
        return f"CacheSnapshot({len(self.states)} layers, {self.tokens} tokens)"

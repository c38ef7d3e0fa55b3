"""SelectiveCache (a transformers ``Cache`` of selkv layers), ``make_cache`` and ``kv_bytes``."""

from __future__ import annotations

import importlib.util

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicSlidingWindowLayer,
    HQQQuantizedLayer,
    QuantizedCache,
    QuantoQuantizedLayer,
    StaticCache,
    get_layer_types_and_kwargs,
)

from .config import CacheSpec, SpecError, parse_spec
from .layers.base import SelectiveLayer
from .layers.evict import EvictLayer
from .layers.sink_window import QuantizedSinkWindowLayer
from .layers.static import StaticSinkWindowLayer
from .quant import tensor_bytes
from .storage import publish, take_published


def _text_config(config):
    if not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"selkv needs the model's config (model.config) to shape a cache, got {type(config).__name__}")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# Layer types whose cache keeps only the last ``sliding_window`` tokens (chunked attention caches like sliding).
SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def layer_plan(config) -> list[tuple[str, int | None]]:
    """Each decoder layer's ``(layer_type, sliding_window)``, read the way transformers' ``DynamicCache`` reads them.

    ``layer_type`` is ``"full_attention"`` (selkv's layers go there) or ``"sliding_attention"`` /
    ``"chunked_attention"`` (these keep transformers' sliding-window layer, which holds at most
    ``sliding_window`` tokens). Any other layer type (linear attention, shared KV, ...) is refused.
    """
    config = _text_config(config)
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    except AttributeError as err:  # e.g. sliding layers named in `layer_types` without a `sliding_window`
        raise SpecError(f"cannot read this model's layer types from its config: {err}") from None
    if isinstance(layer_kwargs, dict):  # transformers < 5.24: one set of keyword arguments for every layer
        layer_kwargs = [layer_kwargs] * len(layer_types)
    other = sorted({t for t in layer_types if t != "full_attention" and t not in SLIDING_LAYER_TYPES})
    if other or len(layer_types) != config.num_hidden_layers:
        found = ", ".join(other) or f"{len(layer_types)} cached of {config.num_hidden_layers}"
        raise SpecError(
            f"selkv caches take full-attention and sliding-window layers; this model also has {found} layers "
            "(use its own cache)"
        )
    return [(t, kwargs.get("sliding_window") if t in SLIDING_LAYER_TYPES else None)
            for t, kwargs in zip(layer_types, layer_kwargs)]


def _num_key_value_heads(config) -> int:
    """KV heads per cached layer, as the model's attention computes them before ``cache.update``."""
    num_heads = config.num_attention_heads
    if hasattr(config, "new_decoder_architecture"):  # Falcon
        if config.new_decoder_architecture:
            # Falcon-40B-style layers broadcast their KV groups to every head before caching them.
            return num_heads
        return 1 if config.multi_query else (getattr(config, "num_kv_heads", None) or num_heads)
    if getattr(config, "multi_query", False):  # GPT-BigCode-style multi-query attention
        return 1
    return getattr(config, "num_key_value_heads", None) or num_heads


def model_shape(config) -> dict:
    """num_hidden_layers, num_key_value_heads, head_dim and layer_types (see :func:`layer_plan`) of a decoder config."""
    layer_types = [layer_type for layer_type, _ in layer_plan(config)]
    config = _text_config(config)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": _num_key_value_heads(config),
        "head_dim": head_dim,
        "layer_types": layer_types,
    }


def resolve_spec(spec: str | CacheSpec, config) -> CacheSpec:
    """``spec`` checked against ``config``, with the defaults that depend on the model (the group size) filled in."""
    return parse_spec(spec).check_model(model_shape(config)["head_dim"])


def _build_layers(config, make_layer) -> list:
    """One cache layer per decoder layer: ``make_layer()`` for full attention, transformers' sliding-window layer else."""
    return [
        make_layer() if layer_type == "full_attention" else DynamicSlidingWindowLayer(sliding_window=sliding_window)
        for layer_type, sliding_window in layer_plan(config)
    ]


class SelectiveCache(Cache):
    """A ``Cache`` whose full-attention layers are selkv layers, built from a :class:`CacheSpec`.

    It only builds ``layers`` and routes by ``layer_idx``; the policy lives in the layer classes.
    With ``max_cache_len`` (``quant`` specs only) the layers are :class:`StaticSinkWindowLayer`: a fixed
    capacity of that many positions, and one-token steps that ``torch.compile`` and CUDA graphs capture
    (``is_compileable``, as transformers' ``StaticCache``) when the model's attention is ``"selkv"``.
    Sliding-window layers of hybrid models (Gemma 2/3, Mistral with a window) keep transformers'
    ``DynamicSlidingWindowLayer``: they hold at most ``sliding_window`` tokens in 16 bits.
    """

    def __init__(self, spec: str | CacheSpec, config, max_cache_len: int | None = None):
        self.spec = resolve_spec(spec, config)
        super().__init__(layers=_build_layers(config, lambda: self._make_layer(self.spec, max_cache_len)))
        # With selkv's attention, one-token decode steps read the compressed storage directly.
        if getattr(_text_config(config), "_attn_implementation", None) == "selkv":
            self.enable_fused_decode()

    def enable_fused_decode(self, enabled: bool = True) -> None:
        """Let one-token decode steps skip dequantization (selkv's attention then reads storage itself)."""
        for layer in self._selkv_layers():
            layer.fused_decode = enabled and layer.supports_fused_decode

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # A one-token step whose storage selkv's attention reads in place: hand it over by layer_idx.
        if getattr(self.layers[layer_idx], "storage_step", False):
            publish(layer_idx, self.layers[layer_idx])
        else:
            take_published(layer_idx)
        return keys, values

    def _selkv_layers(self) -> list[SelectiveLayer]:
        """The full-attention layers (sliding-window layers are transformers' own)."""
        return [layer for layer in self.layers if isinstance(layer, SelectiveLayer)]

    @staticmethod
    def _make_layer(spec: CacheSpec, max_cache_len: int | None = None):
        if spec.kind == "quant":
            layer_class, extra = QuantizedSinkWindowLayer, {}
            if max_cache_len is not None:
                layer_class, extra = StaticSinkWindowLayer, {"max_cache_len": max_cache_len}
            return layer_class(
                spec.nbits,
                spec.num_sink_tokens,
                spec.window_length,
                spec.q_group_size,
                axis_key=spec.axis_key,
                sym=spec.sym,
                block_length=spec.block_length,
                **extra,
            )
        if max_cache_len is not None:
            raise SpecError(f"max_cache_len (a static cache) needs a 'full' or 'quant' spec, not {spec.kind!r}")
        if spec.kind == "drop":
            return EvictLayer(spec.num_sink_tokens, spec.window_length, spec.block_length)
        raise SpecError(f"SelectiveCache builds 'quant' and 'drop' caches, not {spec.kind!r}; use make_cache")

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


def make_cache(spec: str | CacheSpec, config, max_cache_len: int | None = None) -> Cache:
    """Build the cache a spec string describes, for a model ``config``.

    ``full`` gives transformers' ``DynamicCache``; ``hf-quanto``/``hf-hqq`` its ``QuantizedCache``
    (on hybrid models, a ``Cache`` of its quantized layers and sliding-window layers);
    ``drop`` and ``quant`` a :class:`SelectiveCache`.

    ``max_cache_len`` (positions: prompt, new tokens and left padding) makes the cache static, with
    every tensor allocated once: ``full`` gives transformers' ``StaticCache``, ``quant`` a
    :class:`SelectiveCache` of :class:`StaticSinkWindowLayer` whose decode steps ``torch.compile`` and
    CUDA graphs capture (``model.generate`` then compiles them on CUDA, as for ``StaticCache``); the
    model's attention must be ``"selkv"`` for that.
    """
    if max_cache_len is not None:
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise SpecError(f"max_cache_len must be a positive integer, got {max_cache_len!r}")
        kind = parse_spec(spec).kind
        if kind == "full":
            return StaticCache(config=config, max_cache_len=max_cache_len)
        if kind != "quant":
            raise SpecError(f"max_cache_len (a static cache) needs a 'full' or 'quant' spec, not {str(spec)!r}")
    if parse_spec(spec).kind == "full":  # transformers' own cache, for any layer types
        return DynamicCache(config=_text_config(config))
    spec = resolve_spec(spec, config)
    if spec.kind in ("hf-quanto", "hf-hqq"):
        backend, package = {"hf-quanto": ("quanto", "optimum.quanto"), "hf-hqq": ("hqq", "hqq")}[spec.kind]
        if importlib.util.find_spec(package.split(".")[0]) is None or importlib.util.find_spec(package) is None:
            pip_name = {"quanto": "optimum-quanto", "hqq": "hqq"}[backend]
            raise ImportError(f"cache {str(spec)!r} needs the {pip_name!r} package: pip install 'selkv[peers]'")
        settings = {"nbits": spec.nbits, "q_group_size": spec.q_group_size, "residual_length": spec.residual_length}
        if all(layer_type == "full_attention" for layer_type in model_shape(config)["layer_types"]):
            return QuantizedCache(backend=backend, config=config, **settings)
        # transformers' QuantizedCache refuses sliding-window layers: quantize the full-attention ones only.
        layer_class = {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer}[backend]
        return Cache(layers=_build_layers(config, lambda: layer_class(**settings)))
    return SelectiveCache(spec, config, max_cache_len=max_cache_len)


def _dense_shape(layer) -> tuple[int, ...] | None:
    """[batch, heads, seq, head_dim] of a transformers cache layer, dense or quantized (quanto or HQQ)."""
    if layer.keys is not None and layer.keys.dim() == 4:
        return tuple(layer.keys.shape)
    quantized = getattr(layer, "_quantized_keys", None)
    if isinstance(quantized, (tuple, list)):  # HQQ: (codes, meta)
        shape = quantized[1].get("shape") if len(quantized) > 1 and isinstance(quantized[1], dict) else None
        return tuple(shape) if shape is not None else None
    return tuple(quantized.shape) if quantized is not None else None


def layer_bytes(layer, element_size_16bit: int = 2) -> dict[str, int]:
    """One cache layer's bytes (see :func:`kv_bytes`): ``bytes_16bit``, ``bytes_codes``, ``bytes_scales``,
    ``allocated`` and ``full16``, what the layer of a 16-bit ``full`` cache would hold for the same tokens.
    """
    counted = {"bytes_16bit": 0, "bytes_codes": 0, "bytes_scales": 0, "allocated": 0, "full16": 0}
    if not getattr(layer, "is_initialized", False):
        return counted
    if hasattr(layer, "nbytes"):  # selkv layers
        own = layer.nbytes()
        for key in ("bytes_16bit", "bytes_codes", "bytes_scales"):
            counted[key] = own[key]
        counted["allocated"] = own["bytes_allocated"]
        batch, heads, dims = layer.batch_size, layer.num_key_value_heads, layer.head_dim * 2
        tokens = int(layer.get_seq_length())
    else:  # transformers layers: dense keys/values plus anything quantized
        dense = tensor_bytes([layer.keys, layer.values])
        quantized = tensor_bytes([getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)])
        counted["bytes_16bit"], counted["bytes_codes"], counted["allocated"] = dense, quantized, dense + quantized
        shape = _dense_shape(layer)
        if shape is None:
            return counted
        batch, heads, dims = shape[0], shape[1], shape[-1] * 2
        # A sliding-window layer is the same layer in a `full` cache: it holds only the window.
        tokens = shape[2] if getattr(layer, "is_sliding", False) else int(layer.get_seq_length())
    counted["full16"] = batch * heads * dims * tokens * element_size_16bit
    return counted


def kv_bytes(cache: Cache, element_size_16bit: int = 2) -> dict[str, int | float]:
    """Exact KV memory of ``cache``, counted from the tensors it holds.

    Returns ``bytes_16bit`` (unquantized sink/window/residual, and every sliding-window layer),
    ``bytes_codes``, ``bytes_scales``, ``total`` (their sum: the filled part), ``allocated`` (the
    memory really held: the storage of every tensor, spare capacity included; selkv layers count each
    storage once), ``tokens`` (positions seen), ``full16`` (what a 16-bit ``full`` cache of the same
    tokens holds; its sliding-window layers hold only their window), ``compression`` (``full16 /
    allocated``: how much less memory the cache holds) and ``compression_filled`` (``full16 / total``,
    the filled part only). selkv's buffers keep little spare room: less than a page of 8 tokens in
    the window, at most 1/128 of the middle's tokens.
    """
    totals = {"bytes_16bit": 0, "bytes_codes": 0, "bytes_scales": 0, "allocated": 0, "full16": 0}
    for layer in cache.layers:
        for key, value in layer_bytes(layer, element_size_16bit).items():
            totals[key] += value
    return bytes_summary(totals, int(cache.get_seq_length()) if cache.layers else 0)


def bytes_summary(totals: dict[str, int], tokens: int) -> dict[str, int | float]:
    """Summed :func:`layer_bytes` plus ``total``, ``tokens`` and ``compression``, as :func:`kv_bytes` returns them."""
    total = totals["bytes_16bit"] + totals["bytes_codes"] + totals["bytes_scales"]
    return {
        **totals,
        "total": total,
        "tokens": tokens,
        "compression": totals["full16"] / totals["allocated"] if totals["allocated"] else 1.0,
        "compression_filled": totals["full16"] / total if total else 1.0,
    }

"""SelectiveCache (a transformers ``Cache`` of selkv layers), ``make_cache`` and ``kv_bytes``."""

from __future__ import annotations

import importlib.util

import torch
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from .config import CacheSpec, SpecError, parse_spec
from .layers.evict import EvictLayer
from .layers.sink_window import QuantizedSinkWindowLayer
from .quant import tensor_bytes


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_shape(config) -> dict[str, int]:
    """num_hidden_layers, num_key_value_heads and head_dim of a decoder config; rejects non-full attention."""
    config = _text_config(config)
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        found = other or ["sliding_attention"]
        raise SpecError(f"selkv caches need full-attention layers only; this model also has {', '.join(found)} layers")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": head_dim,
    }


class SelectiveCache(Cache):
    """A ``Cache`` whose layers are selkv layers, built from a :class:`CacheSpec`.

    It only builds ``layers`` and routes by ``layer_idx``; the policy lives in the layer classes.
    """

    def __init__(self, spec: str | CacheSpec, config):
        shape = model_shape(config)
        self.spec = parse_spec(spec).check_model(shape["head_dim"])
        layers = [self._make_layer(self.spec) for _ in range(shape["num_hidden_layers"])]
        super().__init__(layers=layers)
        # With selkv's attention, one-token decode steps read the compressed storage directly.
        if getattr(_text_config(config), "_attn_implementation", None) == "selkv":
            self.enable_fused_decode()

    def enable_fused_decode(self, enabled: bool = True) -> None:
        """Let one-token decode steps skip dequantization (selkv's attention then reads storage itself)."""
        for layer in self.layers:
            layer.fused_decode = enabled and layer.supports_fused_decode

    @staticmethod
    def _make_layer(spec: CacheSpec):
        if spec.kind == "quant":
            return QuantizedSinkWindowLayer(
                spec.nbits,
                spec.num_sink_tokens,
                spec.window_length,
                spec.q_group_size,
                axis_key=spec.axis_key,
                sym=spec.sym,
                block_length=spec.block_length,
            )
        if spec.kind == "drop":
            return EvictLayer(spec.num_sink_tokens, spec.window_length, spec.block_length)
        raise SpecError(f"SelectiveCache builds 'quant' and 'drop' caches, not {spec.kind!r}; use make_cache")

    def set_left_padding(self, attention_mask: torch.Tensor) -> None:
        """Reserve sink room for left padding, from a 2D ``attention_mask`` ``[batch_size, seq_len]`` (1 = token)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return
        row_padding = (attention_mask.cumsum(-1) == 0).sum(-1)
        for layer in self.layers:
            layer.set_left_padding(int(row_padding.max()), row_padding)

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)


def make_cache(spec: str | CacheSpec, config) -> Cache:
    """Build the cache a spec string describes, for a model ``config``.

    ``full`` gives transformers' ``DynamicCache``; ``hf-quanto``/``hf-hqq`` its ``QuantizedCache``;
    ``drop`` and ``quant`` a :class:`SelectiveCache`.
    """
    spec = parse_spec(spec).check_model(model_shape(config)["head_dim"])
    if spec.kind == "full":
        return DynamicCache(config=config)
    if spec.kind in ("hf-quanto", "hf-hqq"):
        backend, package = {"hf-quanto": ("quanto", "optimum.quanto"), "hf-hqq": ("hqq", "hqq")}[spec.kind]
        if importlib.util.find_spec(package.split(".")[0]) is None or importlib.util.find_spec(package) is None:
            pip_name = {"quanto": "optimum-quanto", "hqq": "hqq"}[backend]
            raise ImportError(f"cache {str(spec)!r} needs the {pip_name!r} package: pip install 'selkv[peers]'")
        return QuantizedCache(
            backend=backend,
            config=config,
            nbits=spec.nbits,
            q_group_size=spec.q_group_size,
            residual_length=spec.residual_length,
        )
    return SelectiveCache(spec, config)


def _dense_shape(layer) -> tuple[int, ...] | None:
    """[batch, heads, seq, head_dim] of a transformers cache layer, dense or quantized (quanto or HQQ)."""
    if layer.keys is not None and layer.keys.dim() == 4:
        return tuple(layer.keys.shape)
    quantized = getattr(layer, "_quantized_keys", None)
    if isinstance(quantized, (tuple, list)):  # HQQ: (codes, meta)
        shape = quantized[1].get("shape") if len(quantized) > 1 and isinstance(quantized[1], dict) else None
        return tuple(shape) if shape is not None else None
    return tuple(quantized.shape) if quantized is not None else None


def kv_bytes(cache: Cache, element_size_16bit: int = 2) -> dict[str, int | float]:
    """Exact KV memory of ``cache``, counted from the tensors it holds.

    Returns ``bytes_16bit`` (unquantized sink/window/residual), ``bytes_codes``, ``bytes_scales``,
    ``total`` (their sum: the filled part), ``allocated`` (the memory really held: the storage of
    every tensor, spare capacity included; selkv layers count each storage once), ``tokens``
    (positions seen), ``full16`` (what a 16-bit full cache of the same tokens holds),
    ``compression`` (``full16 / allocated``: how much less memory the cache holds) and
    ``compression_filled`` (``full16 / total``, the filled part only). selkv's buffers keep little
    spare room: less than a page of 8 tokens in the window, at most 1/128 of the middle's tokens.
    """
    totals = {"bytes_16bit": 0, "bytes_codes": 0, "bytes_scales": 0, "allocated": 0}
    full16 = 0
    tokens = cache.get_seq_length() if cache.layers else 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if hasattr(layer, "nbytes"):  # selkv layers
            counted = layer.nbytes()
            for key in ("bytes_16bit", "bytes_codes", "bytes_scales"):
                totals[key] += counted[key]
            totals["allocated"] += counted["bytes_allocated"]
            batch, heads, dims = layer.batch_size, layer.num_key_value_heads, layer.head_dim * 2
        else:  # transformers layers: dense keys/values plus anything quantized
            dense = tensor_bytes([layer.keys, layer.values])
            quantized = tensor_bytes([getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)])
            totals["bytes_16bit"] += dense
            totals["bytes_codes"] += quantized
            totals["allocated"] += dense + quantized
            shape = _dense_shape(layer)
            if shape is None:
                continue
            batch, heads, dims = shape[0], shape[1], shape[-1] * 2
        full16 += batch * heads * dims * layer.get_seq_length() * element_size_16bit
    total = totals["bytes_16bit"] + totals["bytes_codes"] + totals["bytes_scales"]
    return {
        **totals,
        "total": total,
        "tokens": tokens,
        "full16": full16,
        "compression": full16 / totals["allocated"] if totals["allocated"] else 1.0,
        "compression_filled": full16 / total if total else 1.0,
    }

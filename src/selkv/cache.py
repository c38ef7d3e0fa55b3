"""``make_cache`` (a spec, string or object, to its cache), ``kv_bytes``; ``SelectiveCache`` and the model-shape
helpers."""

from __future__ import annotations

from transformers.cache_utils import Cache

from .layers.base import BYTE_KEYS, SelectiveLayer
from .quant import tensor_bytes
from .selective_cache import SelectiveCache
from .shapes import SLIDING_LAYER_TYPES, layer_plan, model_shape
from .specs import CacheSpec, SpecError, parse_spec
from .upstream import quantized_layer_tensors

__all__ = [
    "SLIDING_LAYER_TYPES",
    "SelectiveCache",
    "bytes_summary",
    "kv_bytes",
    "layer_bytes",
    "layer_plan",
    "make_cache",
    "model_shape",
    "resolve_spec",
    "bytes_per_device",
]


def resolve_spec(spec: str | CacheSpec, config) -> CacheSpec:
    """``spec`` checked against ``config``, with the defaults that depend on the model (the group size) filled in."""
    return parse_spec(spec).resolve(config)


def make_cache(
    spec: str | CacheSpec, config, max_cache_len: int | None = None, fused_decode: bool | None = None
) -> Cache:
    """Build the cache a spec describes, for a model ``config`` (each kind's ``build``, in :mod:`selkv.specs`).

    ``spec``: a spec string (parsed here, once) or a spec object (``parse_spec``); the spec is checked against
    the model once and builds the cache's layers itself.

    ``full`` gives transformers' ``DynamicCache``; ``hf-quanto``/``hf-hqq`` its ``QuantizedCache``
    (on hybrid models, a ``Cache`` of its quantized layers and sliding-window layers);
    ``drop`` and ``quant`` a :class:`SelectiveCache`.

    ``max_cache_len`` (positions: prompt, new tokens and left padding) makes the cache static, with
    every tensor allocated once: ``full`` gives transformers' ``StaticCache``, ``quant`` a
    :class:`SelectiveCache` of :class:`StaticSinkWindowLayer` whose decode steps ``torch.compile`` and
    CUDA graphs capture (``model.generate`` then compiles them on CUDA, as for ``StaticCache``); the
    model's attention must be ``"selkv"`` for that.

    ``fused_decode`` (``drop``/``quant`` caches): whether one-token steps hand their storage to selkv's attention
    rather than return dequantized keys and values; ``None`` (default) decides from the attention the
    ``config`` records, which is right unless the model's attention changes after the cache is built.
    """
    if max_cache_len is not None:
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise SpecError(f"max_cache_len must be a positive integer, got {max_cache_len!r}")
    parsed = parse_spec(spec)
    if max_cache_len is not None and not parsed.supports_static:
        raise SpecError(f"max_cache_len (a static cache) needs a 'full' or 'quant' spec, not {str(spec)!r}")
    cache = parsed.build(config, max_cache_len=max_cache_len)
    if fused_decode is not None and isinstance(cache, SelectiveCache):
        cache.enable_fused_decode(fused_decode)
    return cache


# What layer_bytes counts per layer (and kv_bytes sums).
LAYER_BYTE_KEYS = (*BYTE_KEYS, "full16")


def _dense_shape(layer) -> tuple[int, ...] | None:
    """[batch, heads, seq, head_dim] of a transformers cache layer, dense or quantized (quanto or HQQ)."""
    if layer.keys is not None and layer.keys.dim() == 4:
        return tuple(layer.keys.shape)
    quantized, _ = quantized_layer_tensors(layer)
    if isinstance(quantized, (tuple, list)):  # HQQ: (codes, meta)
        shape = quantized[1].get("shape") if len(quantized) > 1 and isinstance(quantized[1], dict) else None
        return tuple(shape) if shape is not None else None
    return tuple(quantized.shape) if quantized is not None else None


def layer_bytes(layer, element_size_16bit: int = 2) -> dict[str, int]:
    """One cache layer's bytes (see :func:`kv_bytes`): ``bytes_16bit``, ``bytes_codes`` (``bytes_key_codes`` +
    ``bytes_value_codes``), ``bytes_scales``,
    ``allocated`` and ``full16``, what the layer of a 16-bit ``full`` cache would hold for the same tokens.
    """
    counted = dict.fromkeys(LAYER_BYTE_KEYS, 0)
    if not getattr(layer, "is_initialized", False):
        return counted
    if hasattr(layer, "nbytes"):  # selkv layers
        counted.update(layer.nbytes())  # the same names
        batch, heads, dims = layer.batch_size, layer.num_key_value_heads, layer.head_dim * 2
        tokens = int(layer.get_seq_length())
    else:  # transformers layers: dense keys/values plus anything quantized
        dense = tensor_bytes([layer.keys, layer.values])
        quantized_keys, quantized_values = (tensor_bytes(part) for part in quantized_layer_tensors(layer))
        quantized = quantized_keys + quantized_values
        counted["bytes_16bit"], counted["bytes_codes"], counted["allocated"] = dense, quantized, dense + quantized
        counted["bytes_key_codes"], counted["bytes_value_codes"] = quantized_keys, quantized_values
        shape = _dense_shape(layer)
        if shape is None:
            return counted
        batch, heads, dims = shape[0], shape[1], shape[-1] * 2
        # A sliding-window layer is the same layer in a `full` cache: it holds only the window.
        tokens = shape[2] if getattr(layer, "is_sliding", False) else int(layer.get_seq_length())
    counted["full16"] = batch * heads * dims * tokens * element_size_16bit
    return counted


def kv_bytes(cache: Cache, element_size_16bit: int = 2, per_device: bool = False) -> dict[str, int | float]:
    """Exact KV memory of ``cache``, counted from the tensors it holds.

    Returns ``bytes_16bit`` (unquantized sink/window/residual, and every sliding-window layer),
    ``bytes_codes`` (``bytes_key_codes`` + ``bytes_value_codes``: keys and values may have their own bit
    widths), ``bytes_scales``, ``total`` (their sum: the filled part), ``allocated`` (the
    memory really held: the storage of every tensor, spare capacity included; selkv layers count each
    storage once, and the rotation matrices their layers share once per cache), ``tokens`` (positions seen),
    ``full16`` (what a 16-bit ``full`` cache of the same tokens holds; its sliding-window layers hold only
    their window), ``compression`` (``full16 / allocated``: how much less memory the cache holds) and
    ``compression_filled`` (``full16 / total``, the filled part only). selkv's buffers keep little spare room:
    less than a page of 8 tokens in the window, at most 1/128 of the middle's tokens.

    ``per_device`` adds ``per_device``: the same counts for the layers on each device (a model split
    with ``device_map``), keyed by device name (``"cuda:0"``, ``"cpu"``).
    """
    totals = dict.fromkeys(LAYER_BYTE_KEYS, 0)
    for layer in cache.layers:
        for key, value in layer_bytes(layer, element_size_16bit).items():
            totals[key] += value
    totals["allocated"] += shared_bytes(cache.layers)
    summary = bytes_summary(totals, int(cache.get_seq_length()) if cache.layers else 0)
    if per_device:
        summary["per_device"] = bytes_per_device(cache, summary["tokens"], element_size_16bit)
    return summary


def _layer_device(layer) -> str:
    """Where a filled cache layer's tensors live: selkv layers and transformers' record it at their first update."""
    device = getattr(layer, "device", None)
    return str(device if device is not None else layer.keys.device)


def shared_bytes(layers) -> int:
    """Storage that selkv layers share (the key and value rotation matrices and their +-1 forms, one per rotation,
    head_dim, dtype and device; keys and values with the same rotation share one), counted once."""
    storages = {}
    for layer in layers:
        for shared in layer.shared_tensors() if isinstance(layer, SelectiveLayer) else ():
            storages[shared.untyped_storage().data_ptr()] = shared.untyped_storage().nbytes()
    return sum(storages.values())


def bytes_per_device(cache: Cache, tokens: int, element_size_16bit: int = 2) -> dict[str, dict[str, int | float]]:
    """:func:`kv_bytes`'s counts for the filled layers of each device, keyed by device name."""
    totals: dict[str, dict[str, int]] = {}
    layers: dict[str, list] = {}
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            name = _layer_device(layer)
            counted = layer_bytes(layer, element_size_16bit)
            device = totals.setdefault(name, dict.fromkeys(counted, 0))
            layers.setdefault(name, []).append(layer)
            for key, value in counted.items():
                device[key] += value
    for name, counted in totals.items():
        counted["allocated"] += shared_bytes(layers[name])
    return {device: bytes_summary(counted, tokens) for device, counted in totals.items()}


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


def compression_words(compression: float | None) -> str:
    """A held-memory ratio (``full16 / allocated``) in words: ``"3.13x smaller"``, ``"2.00x larger"`` below 1."""
    if compression is None or compression != compression or compression <= 0:  # missing, NaN or nothing held
        return "–"
    if abs(compression - 1) < 0.005:
        return "the same"
    if compression > 1:
        return f"{compression:.2f}x smaller"
    return f"{1 / compression:.2f}x larger"

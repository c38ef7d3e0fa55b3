"""KV bytes of a cache at a given length for a model's shape, without running the model.

The states pushed through the cache are random: byte counts do not depend on the values, and
``kv_bytes`` counts the tensors the cache really allocated for them.
"""

from __future__ import annotations

import torch

from .cache import (
    LAYER_BYTE_KEYS,
    bytes_summary,
    compression_words,
    layer_bytes,
    layer_plan,
    make_cache,
    model_shape,
    resolve_spec,
    shared_bytes,
)
from .errors import SelKVError
from .specs import CacheSpec, NamedSpecs, named_specs


def load_config(name_or_path: str):
    from transformers import AutoConfig

    from .models import resolve_model

    path, _ = resolve_model(name_or_path)
    return AutoConfig.from_pretrained(path)


@torch.inference_mode()
def cache_size(
    spec: str | CacheSpec,
    config,
    tokens: int,
    batch_size: int = 1,
    chunk: int = 64,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """``kv_bytes`` of ``spec`` after ``tokens`` tokens fed in chunks of ``chunk`` (the perplexity protocol).

    Layers of one kind (full attention with one middle layout, or sliding with one window) hold the same
    tensors for the same token count, so one layer of each kind is filled and its bytes are multiplied by the
    number of such layers (``layer_bits`` layers are kinds of their own).
    """
    if tokens < 1 or chunk < 1 or batch_size < 1:
        raise SelKVError(f"tokens, chunk and batch_size must be >= 1 (got {tokens}, {chunk}, {batch_size})")
    shape = model_shape(config)
    cache = make_cache(spec, config)
    kinds: dict[tuple, list[int]] = {}
    for layer_idx, plan in enumerate(layer_plan(config)):
        kinds.setdefault((plan, getattr(cache.layers[layer_idx], "layout", None)), []).append(layer_idx)
    totals = dict.fromkeys(LAYER_BYTE_KEYS, 0)
    for layer_ids in kinds.values():
        done = 0
        while done < tokens:
            count = min(chunk, tokens - done)
            states = torch.randn(batch_size, shape["num_key_value_heads"], count, shape["head_dim"], dtype=dtype)
            cache.update(states, states.clone(), layer_ids[0])
            done += count
        for key, value in layer_bytes(cache.layers[layer_ids[0]]).items():
            totals[key] += value * len(layer_ids)
    totals["allocated"] += shared_bytes(cache.layers)  # the rotation matrices all layers share, once
    return bytes_summary(totals, tokens)


def describe_model(config) -> str:
    """One line on the cache shape of ``config``: layers by kind, KV heads, head_dim."""
    shape = model_shape(config)
    plans = layer_plan(config)
    sliding = [window for layer_type, window in plans if layer_type != "full_attention"]
    layers = f"{shape['num_hidden_layers']} layers"
    if sliding:
        windows = ", ".join(str(w) for w in sorted(set(sliding)))
        layers += (
            f" ({len(plans) - len(sliding)} full-attention; {len(sliding)} sliding-window of {windows} tokens, "
            "kept 16-bit)"
        )
    return f"{layers}, {shape['num_key_value_heads']} KV heads, head_dim {shape['head_dim']}"


def _group(spec: CacheSpec, config) -> str:
    group = resolve_spec(spec, config).group
    return str(group) if group else "–"


def size_table(specs: NamedSpecs, config, tokens: int, batch_size: int = 1, chunk: int = 64) -> str:
    """A Markdown table of :func:`cache_size` for each spec, in MiB, with the group size each spec gets here.

    ``specs``: spec strings, or (name, spec) pairs / a mapping name -> spec (:func:`selkv.specs.named_specs`); each
    row is named by the spec's name (the text as written)."""
    title = (
        f"KV cache at {tokens} tokens, batch {batch_size}, fed in chunks of {chunk} (bfloat16 model; "
        f"{describe_model(config)})\n"
    )
    rows = [
        title,
        "| cache | group | held MiB | filled MiB | 16-bit MiB | codes MiB | scales MiB | vs 16-bit full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for name, spec in named_specs(specs):
        b = cache_size(spec, config, tokens, batch_size, chunk)
        rows.append(
            f"| `{name}` | {_group(spec, config)} | {b['allocated'] / mib:.2f} | {b['total'] / mib:.2f} | "
            f"{b['bytes_16bit'] / mib:.2f} | {b['bytes_codes'] / mib:.2f} | {b['bytes_scales'] / mib:.2f} | "
            f"{compression_words(b['compression'])} |"
        )
    return "\n".join(rows)

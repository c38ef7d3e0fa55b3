"""KV bytes of a cache at a given length for a model's shape, without running the model.

The states pushed through the cache are random: byte counts do not depend on the values, and
``kv_bytes`` counts the tensors the cache really allocated for them.
"""

from __future__ import annotations

import torch

from .cache import kv_bytes, make_cache, model_shape


def load_config(name_or_path: str):
    from transformers import AutoConfig

    from .models import resolve_model

    path, _ = resolve_model(name_or_path)
    return AutoConfig.from_pretrained(path)


@torch.inference_mode()
def cache_size(spec: str, config, tokens: int, batch_size: int = 1, chunk: int = 64,
               dtype: torch.dtype = torch.bfloat16) -> dict:
    """``kv_bytes`` of ``spec`` after ``tokens`` tokens fed in chunks of ``chunk`` (the perplexity protocol).

    Every layer of a cache holds the same tensors for the same token count, so one layer is filled
    and its bytes are multiplied by the number of layers.
    """
    if tokens < 1 or chunk < 1 or batch_size < 1:
        raise ValueError(f"tokens, chunk and batch_size must be >= 1 (got {tokens}, {chunk}, {batch_size})")
    shape = model_shape(config)
    cache = make_cache(spec, config)
    done = 0
    while done < tokens:
        count = min(chunk, tokens - done)
        states = torch.randn(batch_size, shape["num_key_value_heads"], count, shape["head_dim"], dtype=dtype)
        cache.update(states, states.clone(), 0)
        done += count
    counted = kv_bytes(cache)
    layers = shape["num_hidden_layers"]
    scaled = {key: value * layers for key, value in counted.items() if not key.startswith(("tokens", "compression"))}
    return {**counted, **scaled}


def size_table(specs: list[str], config, tokens: int, batch_size: int = 1, chunk: int = 64) -> str:
    """A Markdown table of :func:`cache_size` for each spec, in MiB.

    ``held`` is the memory the cache really holds (every buffer's storage, spare room included), and
    the ratio compares it with a 16-bit full cache; ``filled`` = 16-bit + codes + scales.
    """
    rows = [
        f"KV cache at {tokens} tokens, batch {batch_size}, fed in chunks of {chunk} (bfloat16 model)\n",
        "| cache | held MiB | filled MiB | 16-bit MiB | codes MiB | scales MiB | vs 16-bit full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for spec in specs:
        b = cache_size(spec, config, tokens, batch_size, chunk)
        rows.append(
            f"| `{spec}` | {b['allocated'] / mib:.2f} | {b['total'] / mib:.2f} | {b['bytes_16bit'] / mib:.2f} | "
            f"{b['bytes_codes'] / mib:.2f} | "
            f"{b['bytes_scales'] / mib:.2f} | {b['compression']:.2f}x |"
        )
    return "\n".join(rows)

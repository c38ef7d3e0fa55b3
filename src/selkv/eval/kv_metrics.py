"""KV-memory fields of an example's record (measured on its cache at the end) and their mean over examples."""

from __future__ import annotations

from ..cache import kv_bytes


def measure_cache(cache) -> dict:
    """KV memory of a cache after an example: ``kv_bytes``, ``kv_bytes_full16``, ``compression`` (+ breakdown).

    ``kv_bytes`` is the memory the cache really holds (``kv_bytes(cache)["allocated"]``, spare room
    included); ``kv_bytes_filled`` the filled part (16-bit + codes + scales).
    """
    counted = kv_bytes(cache)
    return {
        "kv_bytes": counted["allocated"],
        "kv_bytes_filled": counted["total"],
        "kv_bytes_full16": counted["full16"],
        "compression": counted["compression"],
        "kv_bytes_16bit": counted["bytes_16bit"],
        "kv_bytes_codes": counted["bytes_codes"],
        "kv_bytes_scales": counted["bytes_scales"],
        "kv_tokens": counted["tokens"],
    }


def aggregate_kv(records: list[dict]) -> dict:
    """Mean KV bytes over examples (each measured at the example's end) and the ratio of the means."""
    kv = [r["kv_bytes"] for r in records if r.get("kv_bytes") is not None]
    full = [r["kv_bytes_full16"] for r in records if r.get("kv_bytes_full16") is not None]
    if not kv:
        return {}
    mean_kv, mean_full = sum(kv) / len(kv), sum(full) / len(full)
    return {"kv_bytes": mean_kv, "kv_bytes_full16": mean_full, "compression": mean_full / mean_kv if mean_kv else 1.0}

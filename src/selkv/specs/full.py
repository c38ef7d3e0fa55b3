"""``full``: transformers' own 16-bit cache (``DynamicCache``; ``StaticCache`` with ``max_cache_len``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers.cache_utils import Cache, DynamicCache, StaticCache

from ..shapes import _text_config
from .base import CacheSpec


@dataclass(frozen=True)
class FullSpec(CacheSpec):
    """``full``: every token in 16 bits."""

    kind: ClassVar[str] = "full"
    supports_static: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return 16

    def resolve(self, config) -> FullSpec:
        return self  # transformers' own cache, for any layer types: no model shape to check

    def _build(self, config, max_cache_len: int | None = None) -> Cache:
        if max_cache_len is not None:
            return StaticCache(config=config, max_cache_len=max_cache_len)
        return DynamicCache(config=_text_config(config))

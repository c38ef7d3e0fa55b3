"""``drop:sink=4,window=124,block=32``: keep the sink and a window in 16 bits, evict the tokens between."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import SpecError
from ..layers.evict import EvictLayer
from .base import SelectiveSpec, SpecFields


@dataclass(frozen=True)
class DropSpec(SelectiveSpec):
    """``drop``: StreamingLLM-style eviction in blocks of ``block`` tokens."""

    sink: int = 4
    window: int = 124
    block: int = 32

    kind: ClassVar[str] = "drop"
    keys: ClassVar[dict[str, object]] = {"sink": 4, "window": 124, "block": 32}

    @classmethod
    def from_fields(cls, fields: SpecFields) -> DropSpec:
        return cls(
            sink=fields.at_least("sink", 0),
            window=fields.at_least("window", 1),
            block=fields.at_least("block", 1),
        )

    def __str__(self) -> str:
        return f"drop:sink={self.sink},window={self.window},block={self.block}"

    def make_layer(self, max_cache_len: int | None = None) -> EvictLayer:
        if max_cache_len is not None:
            raise SpecError(f"max_cache_len (a static cache) needs a 'full' or 'quant' spec, not {self.kind!r}")
        return EvictLayer(self.sink, self.window, self.block)

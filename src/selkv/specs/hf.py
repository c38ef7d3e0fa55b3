"""``hf-quanto:bits=4,residual=128[,group=64]`` and ``hf-hqq:...``: transformers' ``QuantizedCache``.

The most recent ``residual`` tokens stay in 16 bits; older ones are quantized by the optimum-quanto or
HQQ backend. On hybrid models only the full-attention layers are quantized.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from transformers.cache_utils import Cache, HQQQuantizedLayer, QuantizedCache, QuantoQuantizedLayer

from ..shapes import layer_plan
from .base import GroupedSpec, SpecFields


@dataclass(frozen=True)
class HFQuantizedSpec(GroupedSpec):
    """A transformers ``QuantizedCache`` backend: ``bits``, ``residual``, ``group`` (its ``nbits``,
    ``residual_length``, ``q_group_size``)."""

    bits: int = 0
    residual: int = 128

    keys: ClassVar[dict[str, object]] = {"bits": None, "residual": 128, "group": 0}
    default_group: ClassVar[int] = 64  # transformers' own default
    # Bit widths the backend takes; its name in transformers; the module it needs; its pip name; its layer;
    # the selkv extra that installs it (None: none does).
    supported_nbits: ClassVar[tuple[int, ...]]
    backend: ClassVar[str]
    package: ClassVar[str]
    pip_name: ClassVar[str]
    layer_class: ClassVar[type]
    extra: ClassVar[str | None] = None

    @classmethod
    def install_hint(cls) -> str:
        return f"pip install 'selkv[{cls.extra}]'" if cls.extra else f"pip install {cls.pip_name}"

    @classmethod
    def from_fields(cls, fields: SpecFields) -> HFQuantizedSpec:
        bits = fields.bits(cls.supported_nbits)
        group = fields.group()
        return cls(bits=bits, residual=fields.at_least("residual", 0), group=group)

    def __str__(self) -> str:
        return f"{self.kind}:bits={self.bits},residual={self.residual}{self._group_text()}"

    @property
    def family(self) -> str:
        return f"{self.kind} residual={self.residual}"

    def _settings(self) -> dict:
        """transformers' names for the settings (``nbits``, ``q_group_size``, ``residual_length``)."""
        return {"nbits": self.bits, "q_group_size": self.group, "residual_length": self.residual}

    def make_layer(self, max_cache_len: int | None = None):
        return self.layer_class(**self._settings())

    def _build(self, config, max_cache_len: int | None = None) -> Cache:
        if (
            importlib.util.find_spec(self.package.split(".")[0]) is None
            or importlib.util.find_spec(self.package) is None
        ):
            raise ImportError(f"cache {str(self)!r} needs the {self.pip_name!r} package: {self.install_hint()}")
        if all(layer_type == "full_attention" for layer_type, _ in layer_plan(config)):
            return QuantizedCache(backend=self.backend, config=config, **self._settings())
        # transformers' QuantizedCache refuses sliding-window layers: quantize the full-attention ones only.
        return Cache(layers=self.cache_layers(config))


@dataclass(frozen=True)
class HFQuantoSpec(HFQuantizedSpec):
    kind: ClassVar[str] = "hf-quanto"
    supported_nbits: ClassVar[tuple[int, ...]] = (2, 4)
    backend: ClassVar[str] = "quanto"
    package: ClassVar[str] = "optimum.quanto"
    pip_name: ClassVar[str] = "optimum-quanto"
    layer_class: ClassVar[type] = QuantoQuantizedLayer
    extra: ClassVar[str | None] = "peers"


@dataclass(frozen=True)
class HFHQQSpec(HFQuantizedSpec):
    kind: ClassVar[str] = "hf-hqq"
    supported_nbits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 8)
    backend: ClassVar[str] = "hqq"
    package: ClassVar[str] = "hqq"
    pip_name: ClassVar[str] = "hqq"
    layer_class: ClassVar[type] = HQQQuantizedLayer

"""The base of every cache spec: the ``key=value`` grammar, integer checks and the shared interface.

A spec class names its ``kind``, the spec ``keys`` it takes (with defaults) and turns the parsed values
into its fields (``from_fields``). ``str(spec)`` gives back the canonical spec string, ``check_model``
fills the defaults that depend on the model's ``head_dim`` (``resolve`` reads it from a model config), and
``build`` returns the cache: the spec resolved once, then one layer per decoder layer of the model's layer plan
(``cache_layers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from transformers.cache_utils import DynamicSlidingWindowLayer

from ..errors import SpecError
from ..selective_cache import SelectiveCache
from ..shapes import layer_plan, model_shape

# Larger settings are no use (a window of 2**31 tokens is far beyond any model's context) and beyond
# int64 they would only fail later inside torch.
MAX_SETTING = 2**31 - 1


def _as_int(kind: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SpecError(f"{kind}: {key}={value!r} is not an integer") from None
    if number > MAX_SETTING:
        raise SpecError(f"{kind}: {key}={value} is too large; the largest allowed is {MAX_SETTING}")
    return number


@dataclass(frozen=True)
class SpecFields:
    """The values of one spec string: ``given`` (as written), ``values`` (integers, defaults filled in)."""

    kind: str
    given: dict[str, str]
    values: dict[str, object]

    def at_least(self, key: str, low: int) -> int:
        value = self.values[key]
        if value < low:
            raise SpecError(f"{self.kind}: {key}={value} must be >= {low}")
        return value

    def group(self) -> int:
        """``group``: 0 when left out (the model's default), else >= 1."""
        group = self.values["group"]
        if group < 0 or group == 0 and "group" in self.given:
            raise SpecError(f"{self.kind}: group={group} must be >= 1")
        return group

    def bits(self, allowed: tuple[int, ...], key: str = "bits") -> int:
        nbits = self.values[key]
        if nbits not in allowed:
            raise SpecError(f"{self.kind}: {key}={nbits} is not supported; allowed: {', '.join(map(str, allowed))}")
        return nbits


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec: one subclass per kind. ``str(spec)`` gives back a canonical spec string."""

    kind: ClassVar[str]
    # Spec keys in canonical order, with their defaults; `None` means "required".
    keys: ClassVar[dict[str, object]] = {}
    # Keys whose value is a word, not an integer.
    text_keys: ClassVar[tuple[str, ...]] = ()
    # Whether `build` takes `max_cache_len` (a static cache of fixed capacity).
    supports_static: ClassVar[bool] = False
    # Whether the kind has a bit width that an accuracy-vs-bits plot sweeps.
    sweeps_bits: ClassVar[bool] = False

    @classmethod
    def parse(cls, spec: str) -> CacheSpec:
        """Parse ``spec`` (``kind:key=value,...``, its kind already known to be ``cls.kind``)."""
        kind, allowed = cls.kind, cls.keys
        given: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.strip().partition(":")[2].split(","))):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise SpecError(f"{kind}: expected key=value, got {item!r} in {spec!r}")
            if key not in allowed:
                keys = ", ".join(allowed) or "none"
                raise SpecError(f"{kind}: unknown field {key!r} in {spec!r}; allowed fields: {keys}")
            if key in given:
                raise SpecError(f"{kind}: field {key!r} given twice in {spec!r}")
            given[key] = value
        missing = [k for k, default in allowed.items() if default is None and k not in given]
        if missing:
            raise SpecError(f"{kind}: missing required field {missing[0]!r} in {spec!r}")
        values = {k: given.get(k, default) for k, default in allowed.items()}
        values = {
            k: _as_int(kind, k, v) if isinstance(v, str) and k not in cls.text_keys else v for k, v in values.items()
        }
        return cls.from_fields(SpecFields(kind, given, values))

    @classmethod
    def from_fields(cls, fields: SpecFields) -> CacheSpec:
        """The spec of validated ``fields``."""
        return cls()

    def __str__(self) -> str:
        return self.kind

    @property
    def bits(self) -> int | None:
        """Bits per stored value: 16 for a 16-bit cache, None where the kind has no bit width setting."""
        return None

    @property
    def group(self) -> int:
        """Channels per quantization group (0: none, or not resolved yet)."""
        return 0

    @property
    def is_resolved(self) -> bool:
        """Whether every default that depends on the model is filled in (see :meth:`check_model`)."""
        return True

    @property
    def family(self) -> str:
        """The spec without its bit width: one line of an accuracy-vs-bits plot."""
        return self.kind

    def check_model(self, head_dim: int) -> CacheSpec:
        """Validate against a model's ``head_dim``; return the spec with defaults resolved."""
        return self

    def resolve(self, config) -> CacheSpec:
        """This spec checked against a model ``config`` (:meth:`check_model` on its ``head_dim``), defaults filled
        in."""
        return self.check_model(model_shape(config)["head_dim"])

    def build(self, config, max_cache_len: int | None = None):
        """The cache this spec describes, for a model ``config`` (``max_cache_len``: see ``make_cache``): the spec
        resolved for the model once, then its cache (:meth:`_build`)."""
        return self.resolve(config)._build(config, max_cache_len)

    def _build(self, config, max_cache_len: int | None = None):
        """The cache of this resolved spec."""
        raise NotImplementedError

    def make_layer(self, max_cache_len: int | None = None):
        """The cache layer of one full-attention layer (``max_cache_len``: a static layer of that capacity)."""
        raise NotImplementedError

    def for_layer(self, layer_idx: int) -> CacheSpec:
        """The spec decoder layer ``layer_idx`` is built from: this one, unless the kind sets layers apart
        (``quant``'s ``layer_bits``)."""
        return self

    def cache_layers(self, config, max_cache_len: int | None = None) -> list:
        """One cache layer per decoder layer of the model's layer plan (:func:`~selkv.shapes.layer_plan`):
        :meth:`make_layer` of :meth:`for_layer` for full attention, transformers' sliding-window layer (at most
        ``sliding_window`` tokens, 16-bit) for the others."""
        return [
            self.for_layer(layer_idx).make_layer(max_cache_len)
            if layer_type == "full_attention"
            else DynamicSlidingWindowLayer(sliding_window=sliding_window)
            for layer_idx, (layer_type, sliding_window) in enumerate(layer_plan(config))
        ]


@dataclass(frozen=True)
class GroupedSpec(CacheSpec):
    """A spec with a bit width and a quantization group size (0: the model's default)."""

    # Fields are named as their spec keys (this one replaces the base's read-only property).
    group: int = 0

    sweeps_bits: ClassVar[bool] = True
    # The group size when none is given, for a bit width (before gcd with head_dim).
    default_group: ClassVar[dict[int, int] | int] = 64

    @property
    def group_bits(self) -> int:
        """The bit width whose default group size applies (``default_group``)."""
        return self.bits

    @property
    def is_resolved(self) -> bool:
        return bool(self.group)

    def _group_text(self) -> str:
        return f",group={self.group}" if self.group else ""

    def check_model(self, head_dim: int) -> GroupedSpec:
        default = self.default_group if isinstance(self.default_group, int) else self.default_group[self.group_bits]
        group = self.group or math.gcd(head_dim, default)
        if head_dim % group:
            raise SpecError(f"{self.kind}: group={group} must divide the model's head_dim ({head_dim})")
        return replace(self, group=group)


@dataclass(frozen=True)
class SelectiveSpec(CacheSpec):
    """A spec whose cache is a :class:`SelectiveCache` of one selkv layer per full-attention layer."""

    def _build(self, config, max_cache_len: int | None = None) -> SelectiveCache:
        return SelectiveCache(self.cache_layers(config, max_cache_len), config)

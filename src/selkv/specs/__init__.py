"""Cache specs: one class per kind, listed in :data:`SPECS`; :func:`parse_spec` reads a spec string.

A spec string names a cache kind and its settings::

    full
    drop:sink=4,window=124
    quant:bits=4,sink=4,window=124[,group=G][,key_axis=token|channel][,sym=0|1][,block=T][,rotate=hadamard-signs|hadamard|none]
    quant:kbits=4,vbits=2,...
    hf-quanto:bits=4,residual=128[,group=64]
    hf-hqq:bits=4,residual=128[,group=64]

``parse_spec`` turns it into the kind's spec class (once: the command line and ``make_cache`` pass the object
down); ``spec.check_model(head_dim)`` validates it against a model (``group`` must divide ``head_dim``),
``spec.resolve(config)`` does so for a model config, and ``spec.build(config)`` resolves it once and returns
the cache, whose layers the spec builds from the model's layer plan (``spec.cache_layers``). Every error
names the field, the bad value and what is allowed. A new kind is one module here and one line in
:data:`SPECS`.
"""

from __future__ import annotations

from ..errors import SpecError
from .base import MAX_SETTING, CacheSpec, GroupedSpec, SelectiveSpec
from .drop import DropSpec
from .full import FullSpec
from .hf import HFHQQSpec, HFQuantizedSpec, HFQuantoSpec
from .quant import DEFAULT_BLOCK, DEFAULT_GROUP, DEFAULT_KEY_AXIS, DEFAULT_ROTATE, QuantSpec

# Every cache kind, by the name a spec string starts with.
SPECS: dict[str, type[CacheSpec]] = {
    spec.kind: spec for spec in (FullSpec, DropSpec, QuantSpec, HFQuantoSpec, HFHQQSpec)
}
KINDS = tuple(SPECS)


def parse_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse a spec string (see the module docstring) into its kind's validated spec."""
    if isinstance(spec, CacheSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a cache spec must be a non-empty string, got {spec!r}; kinds: {', '.join(KINDS)}")
    kind = spec.strip().partition(":")[0].strip()
    if kind not in SPECS:
        raise SpecError(f"unknown cache kind {kind!r} in {spec!r}; allowed: {', '.join(KINDS)}")
    return SPECS[kind].parse(spec)


__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_GROUP",
    "DEFAULT_KEY_AXIS",
    "DEFAULT_ROTATE",
    "KINDS",
    "MAX_SETTING",
    "SPECS",
    "CacheSpec",
    "DropSpec",
    "FullSpec",
    "GroupedSpec",
    "HFHQQSpec",
    "HFQuantizedSpec",
    "HFQuantoSpec",
    "QuantSpec",
    "SelectiveSpec",
    "SpecError",
    "parse_spec",
]

"""Cache specs: one class per kind, listed in :data:`SPECS`; :func:`parse_spec` reads a spec string.

A spec string names a cache kind and its settings::

    full
    drop:sink=4,window=124
    quant:bits=4,sink=4,window=124[,group=G][,key_axis=token|channel][,sym=0|1][,vsym=0|1][,block=T]
        [,rotate=hadamard-signs|hadamard|none]
        [,vrotate=none|hadamard|hadamard-signs][,late_kbits=K][,layer_bits=LAYERS:KBITS/VBITS+...]
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

from collections.abc import Iterable, Mapping

from ..errors import SpecError
from .base import MAX_SETTING, CacheSpec, GroupedSpec, SelectiveSpec
from .drop import DropSpec
from .full import FullSpec
from .hf import HFHQQSpec, HFQuantizedSpec, HFQuantoSpec
from .quant import DEFAULT_BLOCK, DEFAULT_GROUP, DEFAULT_KEY_AXIS, DEFAULT_ROTATE, DEFAULT_VROTATE, QuantSpec

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


# What the commands' functions take as their caches: spec strings, spec objects, (name, spec) pairs or a mapping.
NamedSpecs = Mapping[str, CacheSpec] | Iterable[str | CacheSpec | tuple[str, str | CacheSpec]]


def named_specs(specs: NamedSpecs) -> list[tuple[str, CacheSpec]]:
    """Each cache of ``specs`` as (name, spec object), in order, duplicates kept: results and tables are named by the
    name, caches built from the object. A spec string is named as written and parsed here (each distinct one once);
    a spec object is named by ``str(spec)``; (name, spec) pairs and a mapping name -> spec keep their names."""
    if isinstance(specs, (str, CacheSpec)):
        specs = [specs]
    elif isinstance(specs, Mapping):
        specs = specs.items()
    parsed: dict[str, CacheSpec] = {}
    named = []
    for item in specs:
        name, spec = item if isinstance(item, tuple) else (str(item) if isinstance(item, CacheSpec) else item, item)
        if name not in parsed:
            parsed[name] = parse_spec(spec)
        named.append((name, parsed[name]))
    return named


__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_GROUP",
    "DEFAULT_KEY_AXIS",
    "DEFAULT_ROTATE",
    "DEFAULT_VROTATE",
    "KINDS",
    "MAX_SETTING",
    "NamedSpecs",
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
    "named_specs",
    "parse_spec",
]

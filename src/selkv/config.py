"""Cache specifications: the spec-string grammar, defaults and validation.

A spec string names a cache strategy and its settings::

    full
    drop:sink=4,window=124
    quant:bits=4,sink=4,window=124[,group=G][,key_axis=token|channel][,sym=0|1][,block=T]
    hf-quanto:bits=4,residual=128[,group=64]
    hf-hqq:bits=4,residual=128[,group=64]

``parse_spec`` turns it into a :class:`CacheSpec`; ``CacheSpec.check_model``
validates it against a model config (``group`` must divide ``head_dim``).
Every error names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .quant import SUPPORTED_NBITS

KINDS = ("full", "drop", "quant", "hf-quanto", "hf-hqq")

# Fields each kind accepts, with their defaults. `None` means "required".
_FIELDS: dict[str, dict[str, object]] = {
    "full": {},
    "drop": {"sink": 4, "window": 124, "block": 32},
    "quant": {
        "bits": None,
        "sink": 4,
        "window": 124,
        "group": 0,  # 0: gcd(head_dim, DEFAULT_GROUP[bits]), resolved by check_model
        "key_axis": "",  # "": the per-bit-width default below
        "sym": 0,
        "block": 0,  # 0: DEFAULT_BLOCK[bits]
    },
    "hf-quanto": {"bits": None, "residual": 128, "group": 0},
    "hf-hqq": {"bits": None, "residual": 128, "group": 0},
}

# Default key quantization axis per bit width, from the perplexity sweep in
# docs/eval_results.md: per-token keys are lossless at 8 bits, while at 4 and 2 bits a few
# outlier channels dominate each token's range, so per-channel groups (KIVI)
# cost far less accuracy.
DEFAULT_KEY_AXIS = {8: "token", 4: "channel", 2: "channel"}

# Default group size (channels per value group, and per key group with per-token keys) and block (tokens
# per per-channel key group, and per eviction) per bit width, from the perplexity sweep in docs/eval_results.md
# (SmolLM2-135M, PG-19 and WikiText-2, 2,048 tokens, chunk 64, sink 4, window 124), under the memory
# targets at 4,096 tokens (int4 >= 3.1x, int2 >= 5.0x smaller than a 16-bit full cache):
# - int4: value groups of 32 with key blocks of 64 cost the same bytes as groups of 64 with blocks of 32
#   (3.14x) but +0.00% / +0.41% instead of +0.40% / +0.67%.
# - int2: key blocks of 32 (+9.1% / +26.2%, 5.06x). Blocks of 16 are more accurate (+5.5% / +16.2%) but
#   4.4x; block=64 with group=32 is worse (+16.5% / +38.0%). `block=16` remains a spec away.
# A head_dim the per-bit default does not divide (96: Phi-3-mini; 80: Phi-2, StableLM-3B, Pythia-2.8B)
# gets the largest group that divides both: gcd(head_dim, default), 32 and 16 there.
DEFAULT_GROUP = {8: 64, 4: 32, 2: 64}
DEFAULT_BLOCK = {8: 32, 4: 64, 2: 32}

_HF_NBITS = {"hf-quanto": (2, 4), "hf-hqq": (1, 2, 3, 4, 8)}


class SpecError(ValueError):
    """A cache spec string or value that cannot be used."""


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec. ``str(spec)`` gives back a canonical spec string."""

    kind: str
    nbits: int | None = None
    num_sink_tokens: int = 0
    window_length: int = 0
    q_group_size: int = 0
    axis_key: str = "token"
    sym: bool = False
    block_length: int = 1
    residual_length: int = 0

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "drop":
            return f"drop:sink={self.num_sink_tokens},window={self.window_length},block={self.block_length}"
        if self.kind == "quant":
            group = f",group={self.q_group_size}" if self.q_group_size else ""
            return (
                f"quant:bits={self.nbits},sink={self.num_sink_tokens},window={self.window_length}{group},"
                f"key_axis={self.axis_key},sym={int(self.sym)},block={self.block_length}"
            )
        group = f",group={self.q_group_size}" if self.q_group_size else ""
        return f"{self.kind}:bits={self.nbits},residual={self.residual_length}{group}"

    def check_model(self, head_dim: int) -> CacheSpec:
        """Validate against a model's ``head_dim``; return the spec with defaults resolved."""
        if self.kind in ("full", "drop"):
            return self
        default_group = DEFAULT_GROUP[self.nbits] if self.kind == "quant" else 64  # transformers' own default
        group = self.q_group_size or math.gcd(head_dim, default_group)
        if head_dim % group:
            raise SpecError(f"{self.kind}: group={group} must divide the model's head_dim ({head_dim})")
        if self.kind != "quant":
            return replace(self, q_group_size=group)
        per_byte = 8 // self.nbits
        if head_dim % per_byte:
            raise SpecError(f"bits={self.nbits} packs {per_byte} codes per byte; head_dim={head_dim} is not a multiple")
        return replace(self, q_group_size=group)


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


def parse_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse a spec string (see the module docstring) into a validated :class:`CacheSpec`."""
    if isinstance(spec, CacheSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a cache spec must be a non-empty string, got {spec!r}; kinds: {', '.join(KINDS)}")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip()
    if kind not in _FIELDS:
        raise SpecError(f"unknown cache kind {kind!r} in {spec!r}; allowed: {', '.join(KINDS)}")
    allowed = _FIELDS[kind]
    given: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
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
    ints = {k: _as_int(kind, k, v) if isinstance(v, str) and k != "key_axis" else v for k, v in values.items()}

    def at_least(key: str, low: int) -> int:
        value = ints[key]
        if value < low:
            raise SpecError(f"{kind}: {key}={value} must be >= {low}")
        return value

    if kind == "full":
        return CacheSpec(kind)
    if kind == "drop":
        return CacheSpec(
            kind,
            num_sink_tokens=at_least("sink", 0),
            window_length=at_least("window", 1),
            block_length=at_least("block", 1),
        )
    if kind == "quant":
        nbits = ints["bits"]
        if nbits not in SUPPORTED_NBITS:
            raise SpecError(f"quant: bits={nbits} is not supported; allowed: {', '.join(map(str, SUPPORTED_NBITS))}")
        axis = values["key_axis"] or DEFAULT_KEY_AXIS[nbits]
        if axis not in ("token", "channel"):
            raise SpecError(f"quant: key_axis={axis!r} is not allowed; allowed: token, channel")
        if ints["sym"] not in (0, 1):
            raise SpecError(f"quant: sym={ints['sym']} is not allowed; allowed: 0, 1")
        group = ints["group"]
        if group < 0 or group == 0 and "group" in given:
            raise SpecError(f"quant: group={group} must be >= 1")
        if "block" not in given:
            ints["block"] = DEFAULT_BLOCK[nbits]
        return CacheSpec(
            kind,
            nbits=nbits,
            num_sink_tokens=at_least("sink", 0),
            window_length=at_least("window", 0),
            q_group_size=group,
            axis_key=axis,
            sym=bool(ints["sym"]),
            block_length=at_least("block", 1),
        )
    nbits = ints["bits"]
    if nbits not in _HF_NBITS[kind]:
        raise SpecError(f"{kind}: bits={nbits} is not supported; allowed: {', '.join(map(str, _HF_NBITS[kind]))}")
    group = ints["group"]
    if group < 0 or group == 0 and "group" in given:
        raise SpecError(f"{kind}: group={group} must be >= 1")
    return CacheSpec(kind, nbits=nbits, residual_length=at_least("residual", 0), q_group_size=group)

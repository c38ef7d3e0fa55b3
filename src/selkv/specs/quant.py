"""``quant:bits=4,sink=4,window=124[,group=G][,key_axis=token|channel][,sym=0|1][,vsym=0|1][,block=T][,rotate=R]
[,vrotate=R][,late_kbits=K][,layer_bits=...]``.

16-bit sink and window, every token between quantized once to ``bits`` bits, or to ``kbits`` bits per
key and ``vbits`` per value (``quant:kbits=4,vbits=2``; ``bits=B`` is the shorthand for both).

Defaults that depend on the bit width follow the side they concern: ``key_axis``, ``block`` (the
tokens of a per-channel key group) and ``rotate`` follow ``kbits``; ``group`` follows ``vbits``, since value
groups always use it (per-token key groups, with ``key_axis=token``, share it), and so does ``vrotate``.

``rotate=hadamard`` multiplies each key entering the middle by a normalized Hadamard matrix before it
is quantized (QuaRot, SpinQuant): outlier channels are spread over all channels, attention is unchanged
(``q . k = (q H) . (k H)``). ``rotate=hadamard-signs`` flips fixed pseudo-random channel signs first.
Rotation needs a power-of-two ``head_dim``; left out, it is :data:`DEFAULT_ROTATE` for ``kbits`` where
the head_dim allows it and ``none`` elsewhere (resolved by ``check_model``, as the group is).

``vrotate=hadamard`` (or ``hadamard-signs``) rotates each value entering the middle the same way before it
is quantized; attention over the middle gives its output rotated and readers rotate it back
(``o = (sum_n p_n v_n R) R^T``). It also needs a power-of-two ``head_dim``; left out, it is
:data:`DEFAULT_VROTATE` for ``vbits`` (the side it concerns) where the head_dim allows it and ``none``
elsewhere (resolved by ``check_model``, as ``rotate`` is). A rotation the keys use too costs no extra bytes
(one shared matrix); another one is one more ``[head_dim, head_dim]`` matrix per cache.

``vsym=1`` stores the value groups symmetric with no zero (``quant.quantize_midrise``): one float16 scale per
group of ``group`` channels, the ``2**vbits`` levels at odd multiples of half the scale about 0 (2 bits:
``±scale/2``, ``±3 scale/2``). It saves a float16 per value group and fits rotated values, whose groups are
centred on 0. ``sym=1`` is another grid (levels ``-2**(bits-1) .. 2**(bits-1) - 1`` times the scale, its zero
stored, keys and values); with ``vsym=1`` the values use ``vsym``'s. Left out, it is :data:`DEFAULT_VSYM` for
``vbits``.

``layer_bits=LAYERS:KBITS/VBITS+...`` gives some decoder layers other widths: ``LAYERS`` is one layer
``i`` or an inclusive range ``i-j`` (0-based, as ``model.model.layers``), e.g.
``quant:bits=3,block=64,late_kbits=3,layer_bits=1:4/3+5:4/3`` stores 4-bit keys and 3-bit values in layers 1
and 5 and 3-bit keys and values everywhere else (``late_kbits=3``: no later-layer rule). Only the widths change: every
other setting of a listed layer (``group``, ``block``, ``key_axis``, ``sym``, ``vsym``, ``rotate``, ``vrotate``) is the
spec's, and the defaults among them follow the spec's ``kbits``/``vbits``, never a layer's (with ``bits=3``,
a ``4/3`` layer keeps the 3-bit block of 128 and group of 64, not int4's group of 32; give ``group=`` or
``block=`` to set them for every layer). That is what the low-bit sweep's ``layer_bits`` did
(``benchmarks/lowbit_sweep.py``), so its numbers reproduce. Each listed width must pack into the model's
``head_dim`` (checked with the others by ``check_model``); the layers are checked against the model when the
spec is resolved for it (``resolve``): each must exist and be a full-attention layer (sliding-window layers
stay 16-bit). The canonical string lists the layers in order, consecutive layers of the same widths as one
range.

``late_kbits=K`` stores the keys of the later full-attention layers at ``K`` bits (at ``kbits=2`` all ``n`` of them
with ``vsym=1`` and the last ``3n // 4`` with ``vsym=0``; at ``kbits=3`` the last ``2n // 3`` with ``vsym=1`` and
``2n // 5`` with ``vsym=0``; the last ``n // 2`` elsewhere: :func:`late_share`; the share follows ``kbits`` and the
spec's ``vsym``, which follows ``vbits``: mixed widths such as ``kbits=3,vbits=2`` take ``kbits=3``'s share with
symmetric values, a combination no run measured), every other
setting the spec's, as ``layer_bits`` entries ``K/VBITS`` for those layers would (a layer that ``layer_bits`` lists
keeps its entry). Left out, it is :data:`DEFAULT_LATE_KBITS` for ``kbits`` where the head_dim packs those codes: 3 at
2 bits (a head_dim that is a multiple of 8), 4 at 3 bits, and ``kbits`` (no rule) elsewhere, resolved by
``check_model`` as the rotations are; ``late_kbits=2`` (``late_kbits=3``) turns the 2-bit (3-bit) rule off. The layers
are chosen when the spec is resolved for a model (``resolve``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import ClassVar

from ..errors import SpecError
from ..layers.sink_window import QuantizedSinkWindowLayer
from ..layers.static import StaticSinkWindowLayer
from ..middle import MiddleLayout
from ..quant import ROTATIONS, SUPPORTED_NBITS, channel_multiple
from ..shapes import layer_plan
from .base import GroupedSpec, SelectiveSpec, SpecFields

# Default key quantization axis per bit width, from the perplexity sweep in
# docs/eval_results.md: per-token keys are lossless at 8 bits, while at 4 and 2 bits a few
# outlier channels dominate each token's range, so per-channel groups (KIVI)
# cost far less accuracy.
DEFAULT_KEY_AXIS = {8: "token", 4: "channel", 3: "channel", 2: "channel"}

# Default group size (channels per value group, and per key group with per-token keys) and block (tokens
# per per-channel key group, and per eviction) per bit width, from the perplexity sweep in docs/eval_results.md
# (SmolLM2-135M, PG-19 and WikiText-2, 2,048 tokens, chunk 64, sink 4, window 124), under the memory
# targets at 4,096 tokens (int4 >= 3.1x, int2 >= 5.0x smaller than a 16-bit full cache):
# - int4: value groups of 32 with key blocks of 64 cost the same bytes as groups of 64 with blocks of 32
#   (3.14x) but +0.00% / +0.41% instead of +0.40% / +0.67%.
# - int2 (2026-11-29 to 2026-12-06, before rotations): key blocks of 32 (+9.1% / +26.2%, 5.06x). Blocks of 16
#   were more accurate (+5.5% / +16.2%) but 4.4x; block=64 with group=32 worse (+16.5% / +38.0%).
# - int3: value groups of 64; key blocks of 128 (since 2026-12-07; 64 before, 4.09x) pay for 4-bit keys in the
#   last 2/5 of the layers (DEFAULT_LATE_KBITS, STORED_ZERO_LATE_SHARE) at 4.02x; with symmetric values (DEFAULT_VSYM,
#   the default since later on 2026-12-07) in the last 2/3 at 4.01x.
# - int2 (2026-12-07): key blocks of 128, with 3-bit keys in the last 3/4 of the layers (DEFAULT_LATE_KBITS,
#   STORED_ZERO_LATE_SHARE; the default with value zeros stored, vsym=0) at 5.04x: +6.17% / +3.22% / +2.95% /
#   +2.88% (WikiText-2 2,048, PG-19 4,096, PG-19 Dragon's Blood 4,096, a GovReport report 4,096) against +6.68% /
#   +3.47% / +3.51% / +2.80% for key blocks of 64 with 3-bit keys in the later half (2026-12-06 to 07, 5.02x;
#   blocks of 32 and no 3-bit keys before: +10.18% / +4.22% / +6.22%), and a faster kernel (H100, 8 x 32k: 2-bit
#   layers 1.97x bf16 SDPA against 1.60x with blocks of 64). With symmetric values (DEFAULT_VSYM, the default since
#   later on 2026-12-07) 3-bit keys in every layer at 5.03x.
# A head_dim the per-bit default does not divide (96: Phi-3-mini; 80: Phi-2, StableLM-3B, Pythia-2.8B) gets the
# largest group that divides both: gcd(head_dim, default), 32 and 16 there.
DEFAULT_GROUP = {8: 64, 4: 32, 3: 64, 2: 64}
DEFAULT_BLOCK = {8: 32, 4: 64, 3: 128, 2: 128}
# Key width of the later full-attention layers per key bit width (``late_kbits``), from the sweeps in
# docs/eval_results.md (SmolLM2-135M, float32, chunk 64):
# - 2 bits (2026-12-06): with key blocks of 64, 3-bit keys in layers 15-29 of 30 give WikiText-2 +6.68%, in
#   layers 0-14 +16.00%, in the even layers +9.85%, none +17.06% (5.43x). With key blocks of 128 (2026-12-07) 5x
#   affords them in layers 8-29: +6.17% (22 layers chosen on a calibration text instead: +6.50%).
# - 3 bits (2026-12-07): with key blocks of 128 and value zeros stored, 4-bit keys in layers 18-29 of 30 give +0.72% /
#   +0.57% / +0.65% (WikiText-2 2,048, PG-19 4,096, Dragon's Blood 4,096) and +0.47% on a GovReport report no choice
#   looked at, against +2.31% / +0.91% / +0.72% / +0.54% for the former default, at 4.02x against 4.09x. Symmetric
#   values (DEFAULT_VSYM) afford layers 10-29 at 4.01x, and at 2 bits every layer (5.03x): the comment there.
# One model's reading: later layers want wider keys. `late_kbits=KBITS` turns a rule off.
DEFAULT_LATE_KBITS = {2: 3, 3: 4}
# The share of the full-attention layers (the last ones) that ``late_kbits`` widens, per key bit width, within the
# width's held target at its default key blocks of 128 with symmetric values (5x at 2 bits: all of them, 5.03x; 4x
# at 3 bits: 2/3, 20 of 30 layers at 4.01x), and with value zeros stored (vsym=0, STORED_ZERO_LATE_SHARE: 3/4 at 2
# bits, 22 of 30 layers at 5.04x; 2/5 at 3 bits, 4.02x, where the later half would hold 3.97x); a half where no
# default rule is. A spec that sets a smaller ``block`` keeps the share and holds less (``late_kbits=KBITS`` or
# ``layer_bits`` set the layers by hand).
LATE_SHARE = {2: Fraction(1), 3: Fraction(2, 3)}
STORED_ZERO_LATE_SHARE = {2: Fraction(3, 4), 3: Fraction(2, 5)}  # the shares where value groups store their zero

# Key rotation per key bit width, from the float32 perplexity sweep in docs/eval_results.md (2026-12-02,
# SmolLM2-135M, chunk 64): sign-flipped Hadamard keys take int2 from +9.3% / +11.3% / +26.2% to
# +4.2% / +5.2% / +12.5% (PG-19 2,048 / 4,096, WikiText-2) and int4 from +0.28% / +0.33% / +0.41% to
# +0.28% / +0.31% / +0.09%, at the same bytes; int8 is within 0.05% without it. int3 and int2 (since 2026-12-07)
# take the plain matrix, which their values share (below): the 3-bit sweep's best pair (docs/eval_results.md,
# 2026-12-05), and at 2 bits with key blocks of 128 WikiText-2 +6.17% against +6.69% with the signed matrix.
DEFAULT_ROTATE = {8: "none", 4: "hadamard-signs", 3: "hadamard", 2: "hadamard"}
# Value rotation per value bit width, from the float32 perplexity sweep and the library runs in
# docs/eval_results.md (2026-12-06, SmolLM2-135M, chunk 64): Hadamard-rotated 2-bit values take int2 from
# +12.47% / +5.22% / +7.25% to +10.18% / +4.22% / +6.22% (WikiText-2 2,048, PG-19 4,096, PG-19 Dragon's Blood
# 4,096; 5.03x -> 5.02x held at 4,096 tokens: the plain matrix is a second one beside the keys' signed one), needles
# 1.00 at 1,024 and 2,048 tokens. int4 is not helped (+0.09% -> +0.20% on WikiText-2, with plain-Hadamard keys);
# int3's win is with plain-Hadamard keys (WikiText-2 +1.80% -> +0.91%, one matrix for both; with signed keys
# +2.31% -> +2.05%): its default since 2026-12-07. 4 and 8 bits keep none.
DEFAULT_VROTATE = {8: "none", 4: "none", 3: "hadamard", 2: "hadamard"}
# Symmetric value groups without a stored zero (``vsym``) per value bit width, from the sweep and the library runs
# in docs/eval_results.md (2026-12-07, SmolLM2-135M, float32, chunk 64): at 2 bits (Hadamard-rotated values, groups
# of 64) the float16 zero a group no longer stores pays for 3-bit keys in every layer (LATE_SHARE[2]) at 5.03x:
# WikiText-2 2,048 / PG-19 4,096 / Dragon's Blood 4,096 / GovReport 4,096 +4.34% / +2.04% / +2.23% / +2.61%, against
# +6.17% / +3.22% / +2.95% / +2.88% for the stored zero with 3-bit keys in 22 of 30 layers (5.04x). Symmetric
# values alone cost 0.8 point on WikiText-2 (+7.00% at 5.24x, 3-bit keys in 22 layers). At 3 bits they pay for 4-bit
# keys in layers 10-29 at 4.01x: +0.39% / +0.40% / +0.60% / +0.30% against +0.72% / +0.57% / +0.65% / +0.47% for the
# stored zero with 4-bit keys in layers 18-29 (4.02x). 4 and 8 bits keep the zero. Where head_dim is not a power of
# two the values are not rotated (DEFAULT_VROTATE falls back to none) and keep this default: symmetric groups of
# unrotated values were not measured (give vsym=0 to keep the zeros).
DEFAULT_VSYM = {8: False, 4: False, 3: True, 2: True}


def late_share(kbits: int, vsym: bool) -> Fraction:
    """The share of the full-attention layers, the last ones, whose keys ``late_kbits`` widens."""
    if not vsym and kbits in STORED_ZERO_LATE_SHARE:
        return STORED_ZERO_LATE_SHARE[kbits]
    return LATE_SHARE.get(kbits, Fraction(1, 2))


def no_late_rule(kbits: int) -> int:
    """``late_kbits`` for "no rule" at ``kbits``, in its one canonical form: ``kbits`` where the width has a default
    rule (the string must say it is off), 0 (the same as leaving it out) elsewhere."""
    return kbits if kbits in DEFAULT_LATE_KBITS else 0


# One layer's widths in ``layer_bits``: (layer, kbits, vbits).
LayerBits = tuple[int, int, int]
LAYER_BITS_FORM = "LAYERS:KBITS/VBITS items joined by '+', LAYERS i or i-j (e.g. 1:4/3+5-7:4/4)"


def _layer_bits_item(item: str) -> list[LayerBits]:
    """One ``LAYERS:KBITS/VBITS`` item as (layer, kbits, vbits) per layer."""
    layers, colon, widths = item.partition(":")
    first, dash, last = layers.partition("-")
    kbits, slash, vbits = widths.partition("/")
    numbers = (first, last if dash else first, kbits, vbits)
    if not colon or not slash or not all(n.isdigit() and n.isascii() for n in numbers):
        raise SpecError(f"quant: layer_bits item {item!r} is malformed; expected {LAYER_BITS_FORM}")
    first_layer, last_layer, key_bits, value_bits = (int(n) for n in numbers)
    for name, width in (("KBITS", key_bits), ("VBITS", value_bits)):
        if width not in SUPPORTED_NBITS:
            raise SpecError(
                f"quant: layer_bits item {item!r}: {name}={width} is not supported; "
                f"allowed: {', '.join(map(str, SUPPORTED_NBITS))}"
            )
    if last_layer < first_layer:
        raise SpecError(f"quant: layer_bits item {item!r}: the range {layers} runs backwards (give i-j with i <= j)")
    if last_layer > 2**20:
        raise SpecError(f"quant: layer_bits item {item!r}: layer {last_layer} is beyond any model's layers")
    return [(layer, key_bits, value_bits) for layer in range(first_layer, last_layer + 1)]


def parse_layer_bits(text: str) -> tuple[LayerBits, ...]:
    """``layer_bits``'s text (see the module docstring) as (layer, kbits, vbits) per listed layer, by layer."""
    seen: dict[int, LayerBits] = {}
    for item in text.split("+"):
        for entry in _layer_bits_item(item.strip()):
            if entry[0] in seen:
                raise SpecError(f"quant: layer_bits gives layer {entry[0]} twice in {text!r}")
            seen[entry[0]] = entry
    return tuple(sorted(seen.values()))


def layer_bits_text(layer_bits: tuple[LayerBits, ...]) -> str:
    """The canonical text of ``layer_bits``: layers in order, consecutive layers of the same widths as ``i-j``."""
    runs: list[list[int]] = []  # [first, last, kbits, vbits]
    for layer, kbits, vbits in layer_bits:
        if runs and runs[-1][1] == layer - 1 and runs[-1][2:] == [kbits, vbits]:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, kbits, vbits])
    return "+".join(f"{a}{'' if a == b else f'-{b}'}:{k}/{v}" for a, b, k, v in runs)


@dataclass(frozen=True)
class QuantSpec(GroupedSpec, SelectiveSpec):
    """``quant``: selkv's selective quantization (see :class:`QuantizedSinkWindowLayer`)."""

    kbits: int = 0
    vbits: int = 0
    sink: int = 4
    window: int = 124
    key_axis: str = "token"
    sym: bool = False
    vsym: bool = False
    block: int = 1
    rotate: str = ""  # "": DEFAULT_ROTATE[kbits] where head_dim allows, resolved by check_model
    vrotate: str = ""  # "": DEFAULT_VROTATE[vbits] where head_dim allows, resolved by check_model
    layer_bits: tuple[LayerBits, ...] = ()  # (layer, kbits, vbits) per listed layer, by layer
    late_kbits: int = 0  # key width of the later full-attention layers (LATE_SHARE; kbits: no rule; 0: the
    # default, DEFAULT_LATE_KBITS where the head_dim packs it, resolved by check_model; no rule at other widths)
    late_layers: tuple[int, ...] = ()  # those layers, chosen by resolve for a model (late_kbits != kbits)

    kind: ClassVar[str] = "quant"
    keys: ClassVar[dict[str, object]] = {
        "bits": 0,  # 0: not given (then kbits and vbits are required)
        "kbits": 0,  # 0: bits
        "vbits": 0,  # 0: bits
        "sink": 4,
        "window": 124,
        "group": 0,  # 0: gcd(head_dim, DEFAULT_GROUP[vbits]), resolved by check_model
        "key_axis": "",  # "": DEFAULT_KEY_AXIS[kbits]
        "sym": 0,
        "vsym": 0,  # not given: DEFAULT_VSYM[vbits]
        "block": 0,  # 0: DEFAULT_BLOCK[kbits]
        "rotate": "",  # "": DEFAULT_ROTATE[kbits] (none where head_dim is not a power of two)
        "vrotate": "",  # "": DEFAULT_VROTATE[vbits] (none where head_dim is not a power of two)
        "layer_bits": "",  # "": every layer at kbits/vbits
        "late_kbits": 0,  # 0: DEFAULT_LATE_KBITS.get(kbits, kbits), resolved by check_model
    }
    text_keys: ClassVar[tuple[str, ...]] = ("key_axis", "rotate", "vrotate", "layer_bits")
    supports_static: ClassVar[bool] = True
    default_group: ClassVar[dict[int, int]] = DEFAULT_GROUP

    @classmethod
    def from_fields(cls, fields: SpecFields) -> QuantSpec:
        kbits, vbits = cls._bit_widths(fields)
        axis = fields.values["key_axis"] or DEFAULT_KEY_AXIS[kbits]
        if axis not in ("token", "channel"):
            raise SpecError(f"quant: key_axis={axis!r} is not allowed; allowed: token, channel")
        if "vsym" not in fields.given:
            fields.values["vsym"] = int(DEFAULT_VSYM[vbits])
        sym, vsym = fields.values["sym"], fields.values["vsym"]
        for key, flag in (("sym", sym), ("vsym", vsym)):
            if flag not in (0, 1):
                raise SpecError(f"quant: {key}={flag} is not allowed; allowed: 0, 1")
        rotate, vrotate = fields.values["rotate"], fields.values["vrotate"]
        for key, rotation in (("rotate", rotate), ("vrotate", vrotate)):
            if rotation and rotation not in ROTATIONS:
                raise SpecError(f"quant: {key}={rotation!r} is not allowed; allowed: {', '.join(ROTATIONS)}")
        if not vrotate and DEFAULT_VROTATE[vbits] == "none":
            vrotate = "none"  # no rotation to resolve: the same spec as an explicit vrotate=none
        group = fields.group()
        if "block" not in fields.given:
            fields.values["block"] = DEFAULT_BLOCK[kbits]
        late_kbits = fields.bits(SUPPORTED_NBITS, "late_kbits") if "late_kbits" in fields.given else 0
        if late_kbits == kbits:
            late_kbits = no_late_rule(kbits)
        return cls(
            kbits=kbits,
            vbits=vbits,
            sink=fields.at_least("sink", 0),
            window=fields.at_least("window", 0),
            group=group,
            key_axis=axis,
            sym=bool(sym),
            vsym=bool(vsym),
            block=fields.at_least("block", 1),
            rotate=rotate,
            vrotate=vrotate,
            layer_bits=parse_layer_bits(fields.values["layer_bits"]) if "layer_bits" in fields.given else (),
            late_kbits=late_kbits,
        )

    @staticmethod
    def _bit_widths(fields: SpecFields) -> tuple[int, int]:
        """(kbits, vbits) from ``bits`` and/or ``kbits``/``vbits``."""
        given = fields.given
        if "bits" not in given and not ("kbits" in given and "vbits" in given):
            if "kbits" in given or "vbits" in given:
                missing = "vbits" if "kbits" in given else "kbits"
                raise SpecError(f"quant: missing field {missing!r}; give both kbits and vbits, or bits=B for both")
            raise SpecError("quant: missing required field 'bits' (or both 'kbits' and 'vbits')")
        if "bits" in given:
            fields.bits(SUPPORTED_NBITS)
        widths = []
        for key in ("kbits", "vbits"):
            if key not in given:
                widths.append(fields.values["bits"])
                continue
            width = fields.bits(SUPPORTED_NBITS, key)
            if "bits" in given and width != fields.values["bits"]:
                raise SpecError(
                    f"quant: bits={fields.values['bits']} disagrees with {key}={width}; give bits=B "
                    "for both, or kbits and vbits without bits"
                )
            widths.append(width)
        return widths[0], widths[1]

    @property
    def bits(self) -> int | float:
        """Bits per stored code: ``kbits`` when keys and values share it, else their mean."""
        return self.kbits if self.kbits == self.vbits else (self.kbits + self.vbits) / 2

    @property
    def group_bits(self) -> int:
        return self.vbits  # the default group size is a value group's (see the module docstring)

    def _bits_text(self) -> str:
        return f"bits={self.kbits}" if self.kbits == self.vbits else f"kbits={self.kbits},vbits={self.vbits}"

    def __str__(self) -> str:
        return (
            f"quant:{self._bits_text()},sink={self.sink},window={self.window}{self._group_text()},"
            f"key_axis={self.key_axis},sym={int(self.sym)}{self._vsym_text()},block={self.block}{self._late_text()}"
            f"{self._rotate_text()}"
        )

    def _vsym_text(self) -> str:
        # shown when on, and when off where on is the value width's default
        return f",vsym={int(self.vsym)}" if self.vsym or DEFAULT_VSYM[self.vbits] else ""

    def _late_text(self) -> str:
        # 0 (a default to resolve) is left out, and so is "no rule" where that is the width's default
        shown = self.late_kbits and (self.late_kbits != self.kbits or self.kbits in DEFAULT_LATE_KBITS)
        return f",late_kbits={self.late_kbits}" if shown else ""

    def _rotate_text(self) -> str:
        text = f",rotate={self.rotate}" if self.rotate else ""
        # "" (a default to resolve) is left out, and so is "none" where it is the width's default
        if self.vrotate and not (self.vrotate == "none" == DEFAULT_VROTATE[self.vbits]):
            text += f",vrotate={self.vrotate}"
        return text + (f",layer_bits={layer_bits_text(self.layer_bits)}" if self.layer_bits else "")

    @property
    def is_resolved(self) -> bool:
        late_resolved = bool(self.late_kbits) or self.kbits not in DEFAULT_LATE_KBITS
        return bool(self.group) and bool(self.rotate) and bool(self.vrotate) and late_resolved

    @property
    def family(self) -> str:
        return (
            f"quant sink={self.sink},window={self.window},"
            f"key_axis={self.key_axis}"
            + self._vsym_text()
            + self._group_text()
            + self._late_text()
            + self._rotate_text()
        )

    def check_model(self, head_dim: int) -> QuantSpec:
        resolved = super().check_model(head_dim)
        for width in sorted({self.kbits, self.vbits, *(w for _, *widths in self.layer_bits for w in widths)}):
            multiple = channel_multiple(width)
            if head_dim % multiple:
                raise SpecError(
                    f"bits={width} packs its codes in groups of {multiple} channels; "
                    f"head_dim={head_dim} is not a multiple"
                )
        if self.late_kbits and head_dim % channel_multiple(self.late_kbits):
            raise SpecError(
                f"quant: late_kbits={self.late_kbits} packs its codes in groups of {channel_multiple(self.late_kbits)} "
                f"channels; head_dim={head_dim} is not a multiple (give late_kbits={self.kbits}: no rule)"
            )
        if not self.late_kbits and self.kbits in DEFAULT_LATE_KBITS:  # (0 stays: no rule at other widths)
            late = DEFAULT_LATE_KBITS[self.kbits]
            resolved = replace(resolved, late_kbits=self.kbits if head_dim % channel_multiple(late) else late)
        power_of_two = not head_dim & (head_dim - 1)
        for key, rotation in (("rotate", self.rotate), ("vrotate", self.vrotate)):
            if rotation not in ("", "none") and not power_of_two:
                raise SpecError(
                    f"quant: {key}={rotation} needs a power-of-two head_dim; this model's is {head_dim} "
                    f"(use {key}=none)"
                )
        if not self.rotate:
            resolved = replace(resolved, rotate=DEFAULT_ROTATE[self.kbits] if power_of_two else "none")
        if not self.vrotate:
            resolved = replace(resolved, vrotate=DEFAULT_VROTATE[self.vbits] if power_of_two else "none")
        return resolved

    def resolve(self, config) -> QuantSpec:
        """:meth:`check_model` on the model's ``head_dim``, and each ``layer_bits`` layer checked against its layer
        plan: the layer must exist and be a full-attention layer."""
        resolved = super().resolve(config)
        plan = layer_plan(config)
        if resolved.late_kbits not in (0, self.kbits):  # the later full-attention layers
            full = [i for i, (layer_type, _) in enumerate(plan) if layer_type == "full_attention"]
            count = int(len(full) * late_share(self.kbits, self.vsym))
            resolved = replace(resolved, late_layers=tuple(full[len(full) - count :]))
        if self.layer_bits:
            for layer, _, _ in self.layer_bits:
                if layer >= len(plan):
                    raise SpecError(
                        f"quant: layer_bits names layer {layer}; this model has {len(plan)} layers (0-{len(plan) - 1})"
                    )
                if plan[layer][0] != "full_attention":
                    raise SpecError(
                        f"quant: layer_bits names layer {layer}, a {plan[layer][0]} layer of this model, which selkv "
                        "keeps 16-bit; name full-attention layers only"
                    )
        return resolved

    def for_layer(self, layer_idx: int) -> QuantSpec:
        """The spec of decoder layer ``layer_idx``: its ``layer_bits`` widths, if listed, and every other setting
        this spec's (see the module docstring)."""
        # the later layers' widths, then layer_bits' entries over them
        widths = {layer: (self.late_kbits, self.vbits) for layer in self.late_layers}
        widths |= {layer: (kbits, vbits) for layer, kbits, vbits in self.layer_bits}
        if layer_idx in widths:  # an unresolved rotation is the spec's kbits' / vbits' default, as in `layout`
            kbits, vbits = widths[layer_idx]
            rotate = self.rotate or DEFAULT_ROTATE[self.kbits]
            vrotate = self.vrotate or DEFAULT_VROTATE[self.vbits]
            return replace(
                self,
                kbits=kbits,
                vbits=vbits,
                rotate=rotate,
                vrotate=vrotate,
                layer_bits=(),
                late_kbits=no_late_rule(kbits),  # the layer alone (0 could be a default to resolve)
                late_layers=(),
            )
        return replace(self, layer_bits=(), late_layers=()) if self.layer_bits or self.late_layers else self

    @property
    def layout(self) -> MiddleLayout:
        """How the middle is stored: the settings a resolved spec gives its layers (``check_model`` fills the
        group and the rotation); with ``layer_bits``, the layers not listed (:meth:`for_layer` gives each layer's)."""
        return MiddleLayout(
            self.kbits,
            self.vbits,
            self.group,
            axis_key=self.key_axis,
            block_length=self.block,
            rotate=self.rotate or DEFAULT_ROTATE[self.kbits],
            sym=self.sym,
            vrotate=self.vrotate or DEFAULT_VROTATE[self.vbits],
            vsym=self.vsym,
        )

    def make_layer(self, max_cache_len: int | None = None) -> QuantizedSinkWindowLayer | StaticSinkWindowLayer:
        if max_cache_len is not None:
            return StaticSinkWindowLayer(self.sink, self.window, self.layout, max_cache_len=max_cache_len)
        return QuantizedSinkWindowLayer(self.sink, self.window, self.layout)

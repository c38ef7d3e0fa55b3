"""Cache specs: parsing, errors that name field, value and allowed values, the registry of kinds."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support.models import tiny_llama_config
from transformers import DynamicCache

import selkv
from selkv import SpecError

BAD_SPECS = {
    "quant:bits=5": "bits=5 is not supported; allowed: 2, 3, 4, 8",
    "quant:sink=4": "missing required field 'bits'",
    "quant:bits=4,sink=-1": "sink=-1 must be >= 0",
    "drop:window=0": "window=0 must be >= 1",
    "quant:bits=4,window=x": "window='x' is not an integer",
    "quant:bits=4,colour=red": "unknown field 'colour'",
    "quant:bits=4,key_axis=head": "key_axis='head' is not allowed",
    "quant:bits=4,bits=8": "given twice",
    "quant:bits=4,group=0": "group=0 must be >= 1",
    "zip:bits=4": "unknown cache kind 'zip'",
    "quant:bits": "expected key=value",
    "": "non-empty string",
    "hf-quanto:bits=8": "bits=8 is not supported",
    "quant:bits=4,kbits=8": "bits=4 disagrees with kbits=8",
    "quant:bits=4,kbits=4,vbits=2": "bits=4 disagrees with vbits=2",
    "quant:kbits=4": "missing field 'vbits'",
    "quant:vbits=2,sink=4": "missing field 'kbits'",
    "quant:kbits=4,vbits=6": "vbits=6 is not supported; allowed: 2, 3, 4, 8",
    "quant:bits=4,rotate=random": "rotate='random' is not allowed; allowed: none, hadamard, hadamard-signs",
    "quant:bits=4,vrotate=random": "vrotate='random' is not allowed; allowed: none, hadamard, hadamard-signs",
    "quant:bits=4,vrotate=hadamard,vrotate=none": "field 'vrotate' given twice",
    "quant:bits=2,vsym=2": "vsym=2 is not allowed; allowed: 0, 1",
    "quant:bits=2,vsym=yes": "vsym='yes' is not an integer",
    "quant:bits=3,layer_bits=1:4": "layer_bits item '1:4' is malformed; expected LAYERS:KBITS/VBITS",
    "quant:bits=3,layer_bits=1-:4/3": "layer_bits item '1-:4/3' is malformed",
    "quant:bits=3,layer_bits=-1:4/3": "layer_bits item '-1:4/3' is malformed",
    "quant:bits=3,layer_bits=a:4/3": "layer_bits item 'a:4/3' is malformed",
    "quant:bits=3,layer_bits=1:4/3+": "layer_bits item '' is malformed",
    "quant:bits=3,layer_bits=1:5/3": "layer_bits item '1:5/3': KBITS=5 is not supported; allowed: 2, 3, 4, 8",
    "quant:bits=3,layer_bits=1:4/16": "layer_bits item '1:4/16': VBITS=16 is not supported; allowed: 2, 3, 4, 8",
    "quant:bits=3,layer_bits=5-3:4/3": "the range 5-3 runs backwards",
    "quant:bits=3,layer_bits=1-3:4/3+2:8/8": "layer_bits gives layer 2 twice",
    "quant:bits=3,layer_bits=99999999:4/3": "layer 99999999 is beyond any model's layers",
}


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_specs_name_field_value_and_allowed(spec):
    with pytest.raises(SpecError, match=BAD_SPECS[spec].replace("(", r"\(")):
        selkv.parse_spec(spec)


def test_group_must_divide_head_dim():
    with pytest.raises(SpecError, match=r"group=24 must divide the model's head_dim \(32\)"):
        selkv.make_cache("quant:bits=4,group=24", tiny_llama_config())


def test_good_specs_round_trip():
    for text in [
        "full",
        "drop:sink=4,window=124",
        "quant:bits=2,sink=4,window=124,group=32,key_axis=channel,sym=1,block=16",
        "hf-quanto:bits=4,residual=128",
    ]:
        spec = selkv.parse_spec(text)
        assert selkv.parse_spec(str(spec)) == spec
    assert selkv.parse_spec("quant:bits=8").key_axis == "token"
    assert selkv.parse_spec("quant:bits=2").key_axis == "channel"


@pytest.mark.parametrize(
    ("text", "canonical", "kbits", "vbits"),
    [
        ("quant:bits=4", "quant:bits=4,", 4, 4),
        ("quant:kbits=8,vbits=8", "quant:bits=8,", 8, 8),
        ("quant:bits=2,kbits=2", "quant:bits=2,", 2, 2),
        ("quant:kbits=4,vbits=2", "quant:kbits=4,vbits=2,", 4, 2),
        ("quant:vbits=4,kbits=2,key_axis=token", "quant:kbits=2,vbits=4,", 2, 4),
    ],
)
def test_key_and_value_bits(text, canonical, kbits, vbits):
    spec = selkv.parse_spec(text)
    assert (spec.kbits, spec.vbits) == (kbits, vbits)
    assert str(spec).startswith(canonical) and selkv.parse_spec(str(spec)) == spec
    assert spec.bits == (kbits + vbits) / 2


def test_vsym_key():
    """vsym follows vbits' default (on at 2 and 3 bits), is shown where it is on or its width's default is, and
    every layer of a layer_bits spec keeps the spec's."""
    two, four = selkv.parse_spec("quant:bits=2"), selkv.parse_spec("quant:bits=4")
    assert selkv.parse_spec("quant:bits=3").vsym and not selkv.parse_spec("quant:bits=8").vsym
    assert two.vsym and ",sym=0,vsym=1," in str(two) and two.layout.vsym
    assert not four.vsym and "vsym" not in str(four) and not four.layout.vsym
    for text in ("quant:bits=2,vsym=0", "quant:bits=4,vsym=1", "quant:kbits=4,vbits=2", "quant:kbits=2,vbits=4"):
        spec = selkv.parse_spec(text)
        assert selkv.parse_spec(str(spec)) == spec
    assert ",vsym=0," in str(selkv.parse_spec("quant:bits=2,vsym=0"))
    assert selkv.parse_spec("quant:kbits=4,vbits=2").vsym and not selkv.parse_spec("quant:kbits=2,vbits=4").vsym
    assert selkv.parse_spec("quant:bits=2,vsym=0").family != two.family
    mixed = selkv.parse_spec("quant:bits=4,layer_bits=1:4/2")  # the 2-bit-value layer keeps bits=4's vsym=0
    assert not mixed.for_layer(1).layout.vsym and mixed.for_layer(1).layout.value_nbits == 2


def test_rotate_key():
    plain, rotated = selkv.parse_spec("quant:bits=4"), selkv.parse_spec("quant:bits=4,rotate=hadamard")
    assert plain.rotate == "" and "rotate" not in str(plain)  # left out: resolved by check_model
    assert rotated.rotate == "hadamard" and str(rotated).endswith(",rotate=hadamard")
    assert selkv.parse_spec(str(rotated)) == rotated and rotated.family != plain.family
    assert selkv.parse_spec("quant:bits=4,rotate=none").rotate == "none"
    assert rotated.make_layer().layout.rotate == "hadamard"
    with pytest.raises(SpecError, match="rotate=hadamard needs a power-of-two head_dim; this model's is 96"):
        rotated.check_model(96)
    with pytest.raises(SpecError, match="power-of-two head_dim"):
        selkv.make_cache("quant:bits=4,rotate=hadamard", tiny_llama_config(head_dim=48))
    with pytest.raises(SpecError, match="rotate='sideways' is not allowed"):
        selkv.parse_spec("quant:bits=4,rotate=sideways")


def test_vrotate_key():
    """Value rotation: "none" by default at 4 bits (left out of the canonical string), any rotation of ``rotate``,
    in the layout the spec gives its layers; a power-of-two head_dim, else one line that says what to do."""
    plain = selkv.parse_spec("quant:bits=4")
    rotated = selkv.parse_spec("quant:bits=4,rotate=hadamard,vrotate=hadamard,sink=4,window=124")
    assert plain.vrotate == "none" and "vrotate" not in str(plain) and plain.make_layer().layout.vrotate == "none"
    assert rotated.vrotate == "hadamard" and str(rotated).endswith(",rotate=hadamard,vrotate=hadamard")
    assert selkv.parse_spec(str(rotated)) == rotated and rotated.family != plain.family
    resolved = rotated.check_model(64)
    assert selkv.parse_spec(str(resolved)) == resolved and resolved.vrotate == "hadamard"
    layout = resolved.make_layer().layout
    assert (layout.rotate, layout.vrotate) == ("hadamard", "hadamard")
    values_only = selkv.parse_spec("quant:bits=4,vrotate=hadamard-signs")  # the key rotation still resolves
    assert values_only.rotate == "" and str(values_only).endswith(",vrotate=hadamard-signs")
    assert values_only.check_model(64).rotate == "hadamard-signs"
    assert selkv.parse_spec("quant:bits=4,vrotate=none") == selkv.parse_spec("quant:bits=4")
    with pytest.raises(SpecError, match=r"^quant: vrotate=hadamard needs a power-of-two head_dim; this model's is 96 "):
        selkv.parse_spec("quant:bits=4,rotate=none,vrotate=hadamard").check_model(96)
    with pytest.raises(SpecError, match=r"\(use vrotate=none\)$") as info:
        selkv.make_cache("quant:bits=4,rotate=none,vrotate=hadamard-signs", tiny_llama_config(head_dim=48))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kbits", [8, 4, 3, 2])
def test_default_rotation_follows_the_key_bits_and_the_head_dim(kbits):
    from selkv.specs import DEFAULT_ROTATE

    spec = selkv.parse_spec(f"quant:kbits={kbits},vbits=4")
    resolved = spec.check_model(64)
    assert resolved.rotate == DEFAULT_ROTATE[kbits] and resolved.is_resolved and not spec.is_resolved
    assert selkv.parse_spec(str(resolved)) == resolved  # the canonical string names the resolved rotation
    assert spec.check_model(96).rotate == "none"  # a head_dim without a Hadamard matrix: no rotation, no error
    assert spec.make_layer().layout.rotate == DEFAULT_ROTATE[kbits]


@pytest.mark.parametrize("vbits", [8, 4, 3, 2])
def test_default_value_rotation_follows_the_value_bits_and_the_head_dim(vbits):
    from selkv.specs import DEFAULT_VROTATE

    assert DEFAULT_VROTATE == {8: "none", 4: "none", 3: "hadamard", 2: "hadamard"}
    spec = selkv.parse_spec(f"quant:kbits=4,vbits={vbits}")
    resolved = spec.check_model(64)
    assert resolved.vrotate == DEFAULT_VROTATE[vbits] and resolved.is_resolved
    assert selkv.parse_spec(str(resolved)) == resolved  # the canonical string names a resolved rotation
    assert spec.check_model(96).vrotate == "none"  # a head_dim without a Hadamard matrix: no rotation, no error
    assert spec.make_layer().layout.vrotate == DEFAULT_VROTATE[vbits]
    # the keys' width does not choose it
    assert selkv.parse_spec(f"quant:kbits=2,vbits={vbits}").check_model(64).vrotate == DEFAULT_VROTATE[vbits]


def test_two_bit_values_are_rotated_by_default_and_vrotate_none_turns_it_off():
    spec = selkv.parse_spec("quant:bits=2,sink=4,window=124")
    assert spec.vrotate == "" and "vrotate" not in str(spec) and not spec.is_resolved  # resolved by check_model
    assert selkv.parse_spec(str(spec)) == spec
    resolved = spec.check_model(64)
    assert (resolved.rotate, resolved.vrotate) == ("hadamard", "hadamard") and resolved.is_resolved
    assert str(resolved).endswith(",block=128,late_kbits=3,rotate=hadamard,vrotate=hadamard")
    assert "late_kbits" not in str(spec) and spec.late_kbits == 0  # a default, resolved by check_model
    assert selkv.parse_spec(str(resolved)) == resolved
    assert spec.make_layer().layout.vrotate == "hadamard" == resolved.make_layer().layout.vrotate
    # an explicit none wins and stays in the canonical string (it is not the default here)
    off = selkv.parse_spec("quant:bits=2,sink=4,window=124,vrotate=none")
    assert off.vrotate == "none" and str(off).endswith(",vrotate=none") and off != spec and off.family != spec.family
    assert selkv.parse_spec(str(off)) == off and off.check_model(64).vrotate == "none"
    assert off.make_layer().layout.vrotate == "none"
    # a head_dim that is not a power of two: no value rotation, no error, unless one is asked for
    for head_dim in (48, 80, 96):
        assert spec.check_model(head_dim).vrotate == "none"
        cache = selkv.make_cache("quant:bits=2", tiny_llama_config(head_dim=head_dim))
        assert {layer.layout.vrotate for layer in cache.layers} == {"none"}
    assert {layer.layout.vrotate for layer in selkv.make_cache("quant:bits=2", tiny_llama_config()).layers} == {
        "hadamard"
    }
    with pytest.raises(SpecError, match=r"vrotate=hadamard needs a power-of-two head_dim; this model's is 96"):
        selkv.parse_spec("quant:bits=2,vrotate=hadamard").check_model(96)
    # layer_bits: every layer keeps the spec's value rotation (the spec's vbits' default, not a layer's)
    mixed = selkv.parse_spec("quant:bits=2,layer_bits=1:4/4")
    assert mixed.for_layer(1).layout.vrotate == "hadamard" == mixed.check_model(64).for_layer(1).vrotate


@pytest.mark.parametrize(
    "layers,vsym,late",
    [
        (2, "", [0, 1]),
        (30, "", list(range(30))),
        (2, ",vsym=0", [1]),
        (5, ",vsym=0", [2, 3, 4]),
        (6, ",vsym=0", [2, 3, 4, 5]),
        (30, ",vsym=0", list(range(8, 30))),
    ],
)
def test_two_bit_keys_are_three_bit_in_every_layer_or_the_last_three_quarters(layers, vsym, late):
    """The 2-bit default: symmetric values and 3-bit keys in every full-attention layer; with value zeros stored
    (vsym=0, the default of 2026-12-07 before vsym) in the last 3n // 4 of the n layers."""
    config = tiny_llama_config(layers=layers)
    spec = selkv.parse_spec(f"quant:bits=2,sink=4,window=124{vsym}")
    assert (spec.block, spec.late_kbits, spec.vsym) == (128, 0, not vsym) and spec.check_model(32).late_kbits == 3
    assert f",sym=0,vsym={int(not vsym)},block=128,late_kbits=3," in str(spec.check_model(32))
    for form in (spec, spec.check_model(32)):
        assert selkv.parse_spec(str(form)) == form
    assert spec.resolve(config).late_layers == tuple(late)
    widths = [(layer.layout.key_nbits, layer.layout.value_nbits) for layer in selkv.make_cache(spec, config).layers]
    assert widths == [(3, 2) if i in late else (2, 2) for i in range(layers)]
    # every layer keeps the spec's other settings (block, rotations, group)
    assert {
        (layer.layout.block_length, layer.layout.rotate, layer.layout.vrotate)
        for layer in selkv.make_cache(spec, config).layers
    } == {(128, "hadamard", "hadamard")}
    assert {layer.layout.vsym for layer in selkv.make_cache(spec, config).layers} == {not vsym}
    # late_kbits=2 turns the rule off; a layer that layer_bits lists keeps its entry
    off = selkv.parse_spec(f"quant:bits=2,late_kbits=2{vsym}")
    assert ",late_kbits=2" in str(off) and selkv.parse_spec(str(off)) == off and off.family != spec.family
    assert off.resolve(config).late_layers == ()
    assert {layer.layout.key_nbits for layer in selkv.make_cache(off, config).layers} == {2}
    listed = selkv.make_cache(f"quant:bits=2,layer_bits={layers - 1}:4/4{vsym}", config).layers
    assert (listed[-1].layout.key_nbits, listed[-1].layout.value_nbits) == (4, 4)
    assert [layer.layout.key_nbits for layer in listed[:-1]] == [3 if i in late else 2 for i in range(layers - 1)]


@pytest.mark.parametrize(
    "layers,vsym,late",
    [
        (2, "", [1]),
        (3, "", [1, 2]),
        (30, "", list(range(10, 30))),
        (2, ",vsym=0", []),
        (3, ",vsym=0", [2]),
        (5, ",vsym=0", [3, 4]),
        (30, ",vsym=0", list(range(18, 30))),
    ],
)
def test_three_bit_keys_are_four_bit_in_the_last_two_thirds_or_two_fifths(layers, vsym, late):
    """The 3-bit default: key blocks of 128, plain-Hadamard keys and values, symmetric values and 4-bit keys in the
    last 2n // 3 of the n full-attention layers (2n // 5 with value zeros stored, vsym=0); the same caches as the
    explicit layer_bits spec; late_kbits=3 turns the rule off."""
    config = tiny_llama_config(layers=layers, head_dim=64)
    spec = selkv.parse_spec(f"quant:bits=3,sink=4,window=124{vsym}")
    assert spec.vsym == (not vsym) and all(
        layer.layout.vsym == spec.vsym for layer in selkv.make_cache(spec, config).layers
    )
    resolved = spec.resolve(config)
    assert (resolved.block, resolved.rotate, resolved.vrotate, resolved.late_kbits) == (128, "hadamard", "hadamard", 4)
    assert resolved.late_layers == tuple(late) and selkv.parse_spec(str(spec.check_model(64))) == spec.check_model(64)
    layouts = [layer.layout for layer in selkv.make_cache(spec, config).layers]
    assert [(lay.key_nbits, lay.value_nbits) for lay in layouts] == [
        (4, 3) if i in late else (3, 3) for i in range(layers)
    ]
    explicit = f"quant:bits=3,sink=4,window=124,block=128,rotate=hadamard,vrotate=hadamard,late_kbits=3{vsym}"
    if late:
        explicit += f",layer_bits={late[0]}-{late[-1]}:4/3"
    assert [layer.layout for layer in selkv.make_cache(explicit, config).layers] == layouts
    off = selkv.make_cache("quant:bits=3,late_kbits=3", config).layers
    assert {layer.layout.key_nbits for layer in off} == {3}


def test_a_layers_own_spec_has_no_later_layer_rule():
    """A listed or later layer's spec (``for_layer``) is resolved and describes that layer alone: its string does not
    pick up the rule of its own key width (a 3-bit layer of a 4-bit spec, the 3-bit-key layers of the 2-bit
    default)."""
    config = tiny_llama_config(layers=4, head_dim=64)
    for text, layer_idx in (("quant:bits=4,layer_bits=1:3/3", 1), ("quant:bits=2", 3), ("quant:bits=3", 3)):
        resolved = selkv.parse_spec(text).resolve(config)
        layer = resolved.for_layer(layer_idx)
        assert layer.is_resolved and not layer.late_layers and not layer.layer_bits
        again = selkv.parse_spec(str(layer))
        assert again == layer and again.resolve(config).late_layers == ()


def test_late_kbits_defaults_to_no_rule_above_three_bits_and_takes_any_width():
    for text in ("quant:bits=4", "quant:bits=8", "quant:kbits=4,vbits=2", "quant:bits=4,late_kbits=4"):
        spec = selkv.parse_spec(text)
        resolved = spec.check_model(32)
        assert spec.late_kbits == 0 == resolved.late_kbits and "late_kbits" not in str(resolved)
        assert spec == selkv.parse_spec(text.split(",late_kbits")[0])  # no rule given = no rule left out
        assert spec.resolve(tiny_llama_config(layers=4)).late_layers == ()
    spec = selkv.parse_spec("quant:bits=4,late_kbits=8")
    assert str(spec).count("late_kbits=8") == 1 and selkv.parse_spec(str(spec)) == spec
    layers = selkv.make_cache(spec, tiny_llama_config(layers=4)).layers
    assert [layer.layout.key_nbits for layer in layers] == [4, 4, 8, 8]
    with pytest.raises(SpecError, match="late_kbits=5 is not supported"):
        selkv.parse_spec("quant:bits=2,late_kbits=5")
    # a head_dim that packs 2-bit codes but not 3-bit ones (a multiple of 4, not 8): the default falls back to no
    # rule, an explicit late_kbits=3 is refused with one line
    config = tiny_llama_config(head_dim=36, layers=4)
    plain = selkv.make_cache("quant:bits=2,rotate=none,vrotate=none", config).layers
    assert [layer.layout.key_nbits for layer in plain] == [2, 2, 2, 2]
    with pytest.raises(SpecError, match="late_kbits=3 packs its codes in groups of 8 channels; head_dim=36"):
        selkv.make_cache("quant:bits=2,rotate=none,vrotate=none,late_kbits=3", config)


def test_per_bit_defaults_follow_the_side_they_concern():
    # key_axis and block (per-channel key groups) follow kbits; group (value groups) follows vbits.
    from selkv.specs import DEFAULT_BLOCK, DEFAULT_GROUP, DEFAULT_KEY_AXIS

    for kbits, vbits in [(8, 2), (2, 8), (4, 2), (8, 4)]:
        spec = selkv.parse_spec(f"quant:kbits={kbits},vbits={vbits}").check_model(128)
        assert spec.key_axis == DEFAULT_KEY_AXIS[kbits] and spec.block == DEFAULT_BLOCK[kbits]
        assert spec.group == DEFAULT_GROUP[vbits]
        layer = spec.make_layer()
        assert (layer.layout.key_nbits, layer.layout.value_nbits, layer.layout.q_group_size) == (
            kbits,
            vbits,
            spec.group,
        )


def test_each_kind_is_one_spec_class_in_the_registry():
    from selkv.specs import SPECS

    examples = {
        "full": "full",
        "drop": "drop",
        "quant": "quant:bits=4",
        "hf-quanto": "hf-quanto:bits=4",
        "hf-hqq": "hf-hqq:bits=4",
    }
    assert list(SPECS) == list(examples)
    for kind, text in examples.items():
        spec = selkv.parse_spec(text)
        assert type(spec) is SPECS[kind] and spec.kind == kind and isinstance(spec, selkv.CacheSpec)
    # Capabilities, not kind names: a static cache, a bit width to sweep, the bits per stored value.
    assert [k for k, t in examples.items() if selkv.parse_spec(t).supports_static] == ["full", "quant"]
    assert [selkv.parse_spec(t).bits for t in examples.values()] == [16, None, 4, 4, 4]


def test_spec_builds_its_cache():
    config = tiny_llama_config()
    assert isinstance(selkv.parse_spec("drop").build(config), selkv.SelectiveCache)
    cache = selkv.parse_spec("quant:bits=4").build(config)
    assert isinstance(cache, selkv.SelectiveCache) and cache.layers[0].layout.q_group_size == 32  # for head_dim 32
    assert isinstance(selkv.parse_spec("full").build(config), DynamicCache)
    with pytest.raises(TypeError, match="use make_cache"):
        selkv.SelectiveCache("drop", config)
    with pytest.raises(
        SpecError, match="max_cache_len \\(a static cache\\) needs a 'full' or 'quant' spec, not 'drop'"
    ):
        selkv.make_cache("drop", config, max_cache_len=64)


def test_fields_a_kind_does_not_have_are_not_there():
    for text, name in (("full", "nbits"), ("quant:bits=4", "residual_length"), ("full", "colour")):
        with pytest.raises(AttributeError, match=name):
            getattr(selkv.parse_spec(text), name)


@pytest.mark.parametrize(
    ("text", "old_names"),
    [
        (
            "quant:bits=2,sink=3,window=40,group=16,key_axis=token,block=8",
            ["nbits", "num_sink_tokens", "window_length", "q_group_size", "axis_key", "block_length"],
        ),
        ("drop:sink=2,window=9,block=4", ["num_sink_tokens", "window_length", "block_length"]),
        ("hf-quanto:bits=2,residual=7,group=16", ["nbits", "residual_length", "q_group_size"]),
    ],
)
def test_fields_are_named_as_spec_keys_only(text, old_names):
    """A spec's fields are its keys; the names they replaced are gone (CHANGELOG.md lists them)."""
    spec = selkv.parse_spec(text)
    for key, value in (item.split("=") for item in text.partition(":")[2].split(",")):
        assert str(getattr(spec, key)) == value
    for old in old_names:
        with pytest.raises(AttributeError, match=old):
            getattr(spec, old)


MAX_SETTING = 2**31 - 1  # the largest integer a spec takes


@pytest.mark.parametrize("field", ["bits", "sink", "window", "group", "block"])
def test_integers_beyond_the_bound_are_refused_when_parsed(field):
    huge = str(2**64)
    spec = f"quant:bits=4,{field}={huge}" if field != "bits" else f"quant:bits={huge}"
    with pytest.raises(SpecError, match=f"{field}={huge} is too large; the largest allowed is {MAX_SETTING}"):
        selkv.parse_spec(spec)
    assert selkv.parse_spec(f"drop:window={MAX_SETTING}").window == MAX_SETTING


def test_install_hints_name_what_installs_the_backend(monkeypatch):
    """The hint a missing backend gives installs it: an extra of selkv's that lists it, or the package itself."""
    import importlib.util
    import re
    from pathlib import Path

    import tomllib

    from selkv.specs import SPECS

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    real_find_spec = importlib.util.find_spec

    def find_spec_without(package):  # importlib.util.find_spec, as if ``package`` were not installed
        return lambda name, *a: None if name == package else real_find_spec(name, *a)

    for kind in ("hf-quanto", "hf-hqq"):
        spec_class = SPECS[kind]
        monkeypatch.setattr(importlib.util, "find_spec", find_spec_without(spec_class.package.split(".")[0]))
        with pytest.raises(ImportError) as info:
            selkv.make_cache(f"{kind}:bits=4", tiny_llama_config())
        hint = re.search(r"pip install (\S+)", str(info.value)).group(1).strip("'")
        extra = re.fullmatch(r"selkv\[(\w+)\]", hint)
        if extra:
            assert any(req.startswith(spec_class.pip_name) for req in extras[extra.group(1)]), (kind, hint)
        else:
            assert hint == spec_class.pip_name, (kind, hint)


def test_three_bit_codes_need_a_head_dim_of_whole_bytes_of_eight_channels():
    spec = selkv.parse_spec("quant:bits=3")
    assert (spec.kbits, spec.vbits) == (3, 3) and str(spec).startswith("quant:bits=3,")
    resolved = spec.check_model(64)
    assert (resolved.key_axis, resolved.block, resolved.group) == ("channel", 128, 64)
    assert (resolved.rotate, resolved.vrotate, resolved.late_kbits) == ("hadamard", "hadamard", 4)
    with pytest.raises(SpecError, match="bits=3 packs its codes in groups of 8 channels; head_dim=36"):
        selkv.parse_spec("quant:kbits=3,vbits=4,rotate=none").check_model(36)
    with pytest.raises(SpecError, match="bits=2 packs its codes in groups of 4 channels; head_dim=18"):
        selkv.parse_spec("quant:bits=2,rotate=none,group=2").check_model(18)


def test_named_specs_names_by_the_text_and_parses_each_text_once():
    from selkv.specs import named_specs

    quant = selkv.parse_spec("quant:bits=4,window=8")
    named = named_specs(["full", "quant:bits=4, window=8", "full"])
    assert [name for name, _ in named] == ["full", "quant:bits=4, window=8", "full"]
    assert named[0][1] is named[2][1] and named[1][1] == quant
    assert named_specs({"mine": quant}) == [("mine", quant)] == named_specs([("mine", quant)])
    assert named_specs([quant]) == [(str(quant), quant)] and named_specs("full")[0][0] == "full"
    with pytest.raises(SpecError, match="bits=5"):
        named_specs(["full", "quant:bits=5"])


def test_layer_bits_parse_to_a_canonical_string_that_round_trips():
    """Items in any order, ranges or single layers: the canonical string lists the layers in order, consecutive
    layers of the same widths as one range, and parses back to the same spec."""
    spec = selkv.parse_spec("quant:bits=3,block=64,layer_bits=23:4/3 + 1:4/3+5:4/3+6:4/3+2-3:8/8+7:4/2")
    assert spec.layer_bits == ((1, 4, 3), (2, 8, 8), (3, 8, 8), (5, 4, 3), (6, 4, 3), (7, 4, 2), (23, 4, 3))
    assert str(spec).endswith(",layer_bits=1:4/3+2-3:8/8+5-6:4/3+7:4/2+23:4/3")
    assert selkv.parse_spec(str(spec)) == spec
    resolved = spec.check_model(64)
    assert selkv.parse_spec(str(resolved)) == resolved and resolved.layer_bits == spec.layer_bits
    plain = selkv.parse_spec("quant:bits=3,block=64")
    assert "layer_bits" not in str(plain) and plain.layer_bits == () and spec.family != plain.family
    assert selkv.parse_spec("quant:bits=3,layer_bits=0-2:4/4") == selkv.parse_spec(
        "quant:bits=3,layer_bits=0:4/4+1-2:4/4"
    )
    # each layer's spec: its widths, everything else the spec's (the defaults of the spec's bits, not the layer's)
    layer = resolved.for_layer(5)
    assert (layer.kbits, layer.vbits, layer.layer_bits) == (4, 3, ())
    assert (layer.group, layer.block, layer.key_axis, layer.rotate) == (64, 64, "channel", "hadamard")
    assert resolved.for_layer(4) == replace(resolved, layer_bits=())
    assert resolved.for_layer(2).layout == replace(resolved.layout, key_nbits=8, value_nbits=8)
    # unresolved, a listed layer's rotation is still the spec's default (int8's would be none)
    assert spec.for_layer(2).layout == replace(spec.layout, key_nbits=8, value_nbits=8)


def test_layer_bits_are_checked_against_the_model():
    """Layers the model does not have, or keeps 16-bit, and widths its head_dim cannot pack: one line each."""
    config = tiny_llama_config(layers=2)
    with pytest.raises(SpecError, match=r"^quant: layer_bits names layer 2; this model has 2 layers \(0-1\)$"):
        selkv.make_cache("quant:bits=3,layer_bits=1-2:4/3", config)
    with pytest.raises(SpecError, match="layer_bits names layer 5"):
        selkv.parse_spec("quant:bits=3,layer_bits=5:4/3").resolve(config)
    selkv.parse_spec("quant:bits=3,layer_bits=1:4/3").resolve(config)  # a layer it has
    with pytest.raises(SpecError, match="bits=2 packs its codes in groups of 4 channels; head_dim=18"):
        selkv.parse_spec("quant:bits=8,rotate=none,group=2,layer_bits=0:8/2").check_model(18)
    from transformers import Gemma2Config

    hybrid = Gemma2Config(
        vocab_size=256, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    with pytest.raises(SpecError, match=r"layer_bits names layer 0, a sliding_attention layer .* keeps 16-bit"):
        selkv.make_cache("quant:bits=4,layer_bits=0:8/8", hybrid)
    cache = selkv.make_cache("quant:bits=4,layer_bits=1:8/8", hybrid)
    assert cache.layers[1].layout.key_nbits == 8

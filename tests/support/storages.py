"""Random inputs of the kernel tests: fresh seeds, decode storages quantized with quant.py, small shapes."""

from __future__ import annotations

import dataclasses
import random

import torch

from selkv import quant
from selkv.middle import MiddleLayout, MiddleTensors, quantize_middle
from selkv.storage import DecodeStorage

# The shape most kernel tests start from (make_storage's keywords).
SMALL = dict(batch_size=2, num_kv_heads=2, head_dim=32, q_group_size=16, block_length=16)


def fresh_seed() -> int:
    """A new seed on every run (tests put it in their failure messages)."""
    return random.SystemRandom().randrange(2**31)


def make_storage(
    gen: torch.Generator,
    *,
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    num_sink: int,
    num_stored: int,
    num_recent: int,
    nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    dtype: torch.dtype,
    device: str,
    row_padding: list[int] | None = None,
    key_gain: torch.Tensor | None = None,
    value_rms: float = 1.0,
    value_nbits: int | None = None,
    rotate: str = "none",
    vrotate: str = "none",
    vsym: bool = False,
) -> DecodeStorage:
    """Storage of random keys/values quantized with quant.py, spare capacity poisoned with NaN.

    ``nbits`` is the keys' bit width, and the values' unless ``value_nbits`` is given. ``rotate``: the
    middle's keys are rotated (``quant.rotation_matrix``) before they are quantized, as the layer does;
    ``vrotate``: the middle's values likewise. ``vsym``: symmetric value groups with no zero stored.
    ``key_gain`` ``[head_dim]`` multiplies each key channel (default: a tenth of the channels x5);
    ``value_rms`` sets the values' magnitude.
    """

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    B, H, D = batch_size, num_kv_heads, head_dim
    value_nbits = nbits if value_nbits is None else value_nbits
    sink_cap, window_cap = num_sink + 3, num_recent + 5
    stored_cap = -(-(num_stored + block_length) // block_length) * block_length
    # Outlier channels, as real keys have, so that per-channel and per-token groups differ.
    if key_gain is None:
        key_gain = 1.0 + 4.0 * (torch.rand(D, generator=gen) > 0.9).float()

    def region(cap, count):
        keys = torch.full((B, H, cap, D), float("nan"))
        values = torch.full((B, H, cap, D), float("nan"))
        keys[:, :, :count] = randn(B, H, count, D) * key_gain
        values[:, :, :count] = randn(B, H, count, D, scale=value_rms)
        return keys.to(dtype), values.to(dtype)

    sink_keys, sink_values = region(sink_cap, num_sink)
    recent_keys, recent_values = region(window_cap, num_recent)
    if row_padding is not None:  # padding positions hold finite junk that would dominate if read
        for b, pad in enumerate(row_padding):
            sink_keys[b, :, :pad] = 30.0
            sink_values[b, :, :pad] = 1000.0
    layout = MiddleLayout(nbits, value_nbits, q_group_size, axis_key, block_length, rotate, vrotate=vrotate, vsym=vsym)
    args = dict(
        sink_keys=sink_keys.to(device),
        sink_values=sink_values.to(device),
        num_sink=num_sink,
        recent_keys=recent_keys.to(device),
        recent_values=recent_values.to(device),
        num_recent=num_recent,
        num_stored=num_stored,
        layout=layout,
        row_padding=None if row_padding is None else torch.tensor(row_padding, dtype=torch.int32, device=device),
    )
    if num_stored == 0:
        return DecodeStorage(middle=None, **args)
    rotation, value_rotation = quant.rotation_matrix(rotate, D), quant.rotation_matrix(vrotate, D)
    keys = (randn(B, H, stored_cap, D) * key_gain).to(dtype)
    values = randn(B, H, stored_cap, D, scale=value_rms).to(dtype)
    kc, ks, kz, vc, vs, vz = quantize_middle(keys, values, layout, key_rotation=rotation, value_rotation=value_rotation)
    vc = quant.from_block_major(vc, block_length)
    # Poison what lies beyond num_stored: random codes, NaN scales.
    kc[:, :, num_stored:] = torch.randint(0, 256, kc[:, :, num_stored:].shape, generator=gen, dtype=torch.uint8)
    vc[:, :, num_stored:] = torch.randint(0, 256, vc[:, :, num_stored:].shape, generator=gen, dtype=torch.uint8)
    vc = quant.to_block_major(vc, block_length)  # the layer's value layout
    key_rows = -(-num_stored // block_length) if axis_key == "channel" else num_stored
    for t in (ks, kz):
        t[:, :, key_rows:] = float("nan")
    for t in (vs, vz):
        t[:, :, num_stored:] = float("nan")
    args.update(
        middle=MiddleTensors(kc, ks, kz, vc, vs, vz).map(lambda t: t.to(device)),
        key_rotation=None if rotation is None else rotation.to(device),
        key_rotation_signs=quant.rotation_signs(rotate, D, dtype, device),
        value_rotation=None if value_rotation is None else value_rotation.to(device),
        value_rotation_signs=quant.rotation_signs(vrotate, D, dtype, device),
    )
    return DecodeStorage(**args)


def with_device_lengths(storage: DecodeStorage, gen: torch.Generator) -> DecodeStorage:
    """The same tokens laid out as a static cache holds them: lengths on the device, the window in a ring
    that starts at a random slot (and wraps), every capacity larger than what is filled."""
    s = storage
    ring = s.num_recent + 3 + int(torch.randint(0, 5, (1,), generator=gen))
    start = int(torch.randint(0, ring, (1,), generator=gen))
    slots = (start + torch.arange(s.num_recent)) % ring
    ring_keys = torch.full(
        s.recent_keys.shape[:2] + (ring,) + s.recent_keys.shape[3:],
        float("nan"),
        dtype=s.recent_keys.dtype,
        device=s.recent_keys.device,
    )
    ring_values = ring_keys.clone()
    ring_keys[:, :, slots.to(ring_keys.device)] = s.recent_keys[:, :, : s.num_recent]
    ring_values[:, :, slots.to(ring_keys.device)] = s.recent_values[:, :, : s.num_recent]
    lengths = torch.tensor(
        [s.num_sink, s.num_stored, s.num_recent, start], dtype=torch.int32, device=s.sink_keys.device
    )
    middle_capacity = s.middle.key_codes.shape[2] if s.middle is not None else 0
    return dataclasses.replace(
        s,
        recent_keys=ring_keys,
        recent_values=ring_values,
        num_sink=s.sink_keys.shape[2],
        num_stored=middle_capacity,
        num_recent=ring,
        lengths=lengths,
    )

"""The float64 attention the kernels and their PyTorch twin are compared with, written independently of both."""

from __future__ import annotations

import torch

from selkv.storage import DecodeStorage


def token_major(block_major: torch.Tensor, block: int) -> torch.Tensor:
    """Block-major value codes back in token order, by addresses: token n's byte c of a (row, head) sits at
    (n // block) * block * P + c * block + n % block (written independently of quant.from_block_major)."""
    B, H, capacity, P = block_major.shape
    n, c = torch.arange(capacity)[:, None], torch.arange(P)[None, :]
    index = (n // block) * block * P + c * block + n % block
    return block_major.cpu().reshape(B, H, capacity * P)[:, :, index.flatten()].reshape(B, H, capacity, P)


def float64_reference(
    query: torch.Tensor, storage: DecodeStorage, scaling: float, round_middle: bool = True
) -> torch.Tensor:
    """Attention in float64 from the storage (host lengths), dequantized independently of the twin; [B, 1, Hq, D].

    ``round_middle``: round the dequantized middle to the query's dtype, as the model's cache does;
    without it, exact attention over the kernel's own inputs (codes, scales, zeros).
    """
    args = {**vars(storage), **vars(storage.layout), **(storage.middle._asdict() if storage.middle else {})}
    D = query.shape[-1]
    ns, nm, nr = args["num_sink"], args["num_stored"], args["num_recent"]
    keys = [args["sink_keys"][:, :, :ns].double().cpu()]
    values = [args["sink_values"][:, :, :ns].double().cpu()]
    if nm:

        def codes(packed, nbits):  # plane p of byte j is channel p * D/k + j
            packed = packed[:, :, :nm].cpu().long()
            if nbits == 3:  # channel p * D/4 + j: low bits in byte j, high bit in byte D/4 + j % (D/8)
                j = torch.arange(D // 4)
                low = [(packed[..., j] >> (2 * p)) & 3 for p in range(4)]
                high = [(packed[..., D // 4 + j % (D // 8)] >> (2 * p + j // (D // 8))) & 1 for p in range(4)]
                return torch.cat([lo + 4 * hi for lo, hi in zip(low, high, strict=True)], dim=-1).double()
            per_byte, mask = 8 // nbits, 2**nbits - 1
            return torch.cat([(packed >> (p * nbits)) & mask for p in range(per_byte)], dim=-1).double()

        g = args["q_group_size"]
        if args["axis_key"] == "channel":
            t = args["block_length"]
            rows = torch.arange(nm) // t
            ks = args["key_scale"].cpu().double()[:, :, rows]
            kz = args["key_zero"].cpu().double()[:, :, rows]
        else:
            ks = args["key_scale"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
            kz = args["key_zero"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        vs = args["value_scale"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        if args["vsym"]:  # no zero stored: levels at odd multiples of scale / 2 about 0
            vz = -(2 ** args["value_nbits"] - 1) / 2 * vs
        else:
            vz = args["value_zero"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        dtype = query.dtype if round_middle else torch.float64  # rounded like the model's cache, or exact
        middle_keys = codes(args["key_codes"], args["key_nbits"]) * ks + kz
        if args["key_rotation"] is not None:  # stored rotated: rotate back (orthogonal: its transpose)
            middle_keys = middle_keys @ args["key_rotation"].cpu().double().T
        keys.append(middle_keys.to(dtype).double())
        middle_values = codes(token_major(args["value_codes"], args["block_length"]), args["value_nbits"]) * vs + vz
        if args["value_rotation"] is not None:  # stored rotated: rotate back (orthogonal: its transpose)
            middle_values = middle_values @ args["value_rotation"].cpu().double().T
        values.append(middle_values.to(dtype).double())
    keys.append(args["recent_keys"][:, :, :nr].double().cpu())
    values.append(args["recent_values"][:, :, :nr].double().cpu())
    k, v = torch.cat(keys, -2), torch.cat(values, -2)
    B, Hq = query.shape[:2]
    H = k.shape[1]
    q = query.double().cpu().reshape(B, H, Hq // H, D)
    scores = q @ k.transpose(-1, -2) * scaling
    if args["row_padding"] is not None:
        padded = torch.arange(k.shape[-2])[None, :] < args["row_padding"].cpu().long()[:, None]
        scores = scores.masked_fill(padded[:, None, None, :], float("-inf"))
        v = v.masked_fill(padded[:, None, :, None], 0.0)
    out = torch.softmax(scores, -1) @ v
    return out.reshape(B, Hq, 1, D).transpose(1, 2)

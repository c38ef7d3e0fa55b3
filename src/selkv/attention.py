"""selkv's attention for transformers: ``attn_implementation="selkv"``.

Importing this module (``import selkv`` does) registers :func:`selkv_attention_forward` with
transformers' ``AttentionInterface`` and sdpa's mask function with ``AttentionMaskInterface``
under the name ``"selkv"``, so that either of::

    AutoModelForCausalLM.from_pretrained(name, attn_implementation="selkv")
    model.set_attn_implementation("selkv")

selects it. A :class:`~selkv.SelectiveCache` built for such a model publishes each layer after a
one-token decode step (``selkv.storage.publish``, keyed by ``layer_idx``; also a ``drop`` layer after its
first chunk, whose mask attention checks for padding it cannot serve); the attention function
takes the layer's :class:`~selkv.storage.DecodeStorage` and reads the compressed cache directly:
the fused Triton kernel on CUDA, its PyTorch twin elsewhere. Everything else (prefill, other
caches) is plain SDPA on the keys, values and mask it is given.

Left padding is read from the attention mask of each decode step, so a padded batch is right
without :func:`selkv.track_padding`; that hook only adds sink room, so that each row's sink holds
its first real tokens rather than padding.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import UnsupportedInputError, UnsupportedModelError
from .kernels import reference, triton_available
from .storage import ATTENTION_NAME, DecodeStorage, take_published

# Whether Triton is installed, looked up once (an import-system lookup cannot be traced by torch.compile).
_TRITON = triton_available()
# The kernel module once imported. It is imported by an eager call (a prefill, or compile_decode_step),
# never inside a compiled region: importing is not something torch.compile traces.
_KERNELS = None


def kernel_module():
    """selkv's fused kernel module (``kernels.decode_op``) when it can run here (Triton installed), imported outside
    compiled code; ``None`` without Triton."""
    global _KERNELS
    if _KERNELS is None and _TRITON and not torch.compiler.is_compiling():
        from .kernels import decode_op

        _KERNELS = decode_op
    return _KERNELS


def _use_kernel(query: torch.Tensor, storage: DecodeStorage):
    """The kernel module if the fused kernel takes this step, else ``None`` (the PyTorch twin does)."""
    if not query.is_cuda:
        return None
    kernels = kernel_module()
    if kernels is None:
        return None
    head_dim = query.shape[-1]
    num_key_value_groups = query.shape[1] // storage.num_key_value_heads  # query heads per KV head
    layout = storage.layout
    why = kernels.check_supported(
        head_dim, num_key_value_groups, layout.key_nbits, layout.q_group_size, query.dtype, layout.value_nbits
    )
    return kernels if why is None else None


def kernel_device(device: torch.device):
    """A context that makes ``device`` the current CUDA device for a kernel launch.

    Triton launches on the current CUDA device whatever device its tensors are on, and a model split
    with ``device_map`` runs its later layers on other GPUs than the current one. Compiled steps are
    left alone: a CUDA graph is captured and replayed on one device.
    """
    if device.type != "cuda" or device.index is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _row_padding_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's left padding ``[batch_size]`` int32 from a decode step's mask, or ``None`` without a mask.

    ``attention_mask`` is what transformers hands the attention function: sdpa's boolean
    ``[batch_size, 1, q_len, kv_length]`` (True = attend), or an additive float mask (0 = attend).
    A selkv layer's ``get_mask_sizes`` gives ``kv_offset = 0`` and ``kv_length`` = every position
    seen, so column ``i`` is position ``i``, which is the ``i``-th token of sink + middle + window.
    The padding is the number of masked columns before the first attended one in the last query row.
    Device ops only (no host sync), so the step stays capturable.
    """
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, :]  # [batch_size, kv_length]
    attended = last_row if last_row.dtype == torch.bool else last_row == 0
    return attended.to(torch.uint8).argmax(-1).to(torch.int32)  # argmax gives the first attended column


def _refuse_padding(attention_mask: torch.Tensor | None) -> None:
    """For layers whose kept tokens are not contiguous positions (``drop``): no padded rows."""
    if attention_mask is None:
        return
    attended = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if not bool(attended[:, :, -1, :].all()):  # the last query token attends to every earlier real token
        raise UnsupportedInputError(
            "this selkv cache does not support left-padded batches (its kept tokens are not contiguous "
            "positions, which the padding mask assumes); run rows one at a time"
        )


def selkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; ``query`` ``[batch_size, num_heads, q_len, head_dim]``.

    Returns ``([batch_size, q_len, num_heads, head_dim], None)``.
    """
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError(
            "attn_implementation='selkv' does not apply attention-logit softcapping (Gemma 2); load this model "
            "with attn_implementation='eager' (selkv caches work with it)"
        )
    layer = take_published(getattr(module, "layer_idx", None))
    if layer is not None and layer.checks_padding:
        _refuse_padding(attention_mask)
    if layer is None or not layer.storage_step or query.shape[2] != 1:
        if query.is_cuda:
            kernel_module()  # import the kernels now (eagerly) for the decode steps that follow
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    storage = layer.decode_storage()
    if attention_mask is not None:  # the mask knows the padding whether or not track_padding told the cache
        storage = dataclasses.replace(storage, row_padding=_row_padding_from_mask(attention_mask))
    kernels = _use_kernel(query, storage)
    if kernels is not None:
        with kernel_device(query.device):
            out = kernels.decode_attention(query, storage, scaling=scaling)
    else:
        out = reference.selective_decode_attention(query, storage, scaling=scaling)
    return out, None


def register_attention() -> None:
    """Register ``"selkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, selkv_attention_forward)
    # Prefill and fallback steps are SDPA on the given tensors, so they take SDPA's masks.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register_attention()

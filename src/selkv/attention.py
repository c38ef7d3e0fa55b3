"""selkv's attention for transformers: ``attn_implementation="selkv"``.

Importing this module (``import selkv`` does) registers :func:`selkv_attention_forward` with
transformers' ``AttentionInterface`` and sdpa's mask function with ``AttentionMaskInterface``
under the name ``"selkv"``, so that either of::

    AutoModelForCausalLM.from_pretrained(name, attn_implementation="selkv")
    model.set_attn_implementation("selkv")

selects it. A :class:`~selkv.SelectiveCache` built for such a model hands one-token decode
steps over as storage handles (``key.selkv_layer``); those steps read the compressed cache
directly: the fused Triton kernel on CUDA, its PyTorch twin elsewhere. Everything else
(prefill, other caches) is plain SDPA on the keys, values and mask it is given.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import reference, storage_arguments, triton_available

ATTENTION_NAME = "selkv"


def _use_kernel(query: torch.Tensor, layer, num_key_value_groups: int) -> bool:
    if not query.is_cuda or not triton_available():
        return False
    from .kernels import decode_attention_module

    kernels = decode_attention_module()
    head_dim = query.shape[-1]
    return kernels.check_supported(head_dim, num_key_value_groups, layer.nbits, layer.q_group_size, query.dtype) is None


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
        raise ValueError(
            "attn_implementation='selkv' does not apply attention-logit softcapping (Gemma 2); load this model "
            "with attn_implementation='eager' (selkv caches work with it)"
        )
    layer = getattr(key, "selkv_layer", None)
    if layer is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // layer.num_key_value_heads
    args = storage_arguments(layer)
    if _use_kernel(query, layer, groups):
        from .kernels import decode_attention_module

        out = decode_attention_module().selective_decode_attention(query, **args, scaling=scaling)
    else:
        out = reference.selective_decode_attention(query, **args, scaling=scaling)
    return out, None


def register_attention() -> None:
    """Register ``"selkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, selkv_attention_forward)
    # Prefill and fallback steps are SDPA on the given tensors, so they take SDPA's masks.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register_attention()

"""selkv's attention for transformers: ``attn_implementation="selkv"``.

Importing this module (``import selkv`` does) registers :func:`selkv_attention_forward` with
transformers' ``AttentionInterface`` and sdpa's mask function with ``AttentionMaskInterface``
under the name ``"selkv"``, so that either of::

    AutoModelForCausalLM.from_pretrained(name, attn_implementation="selkv")
    model.set_attn_implementation("selkv")

selects it. A :class:`~selkv.SelectiveCache` built for such a model publishes each layer after a
one-token decode step (``selkv.storage.publish``, keyed by ``layer_idx``); the attention function
takes the layer's :class:`~selkv.storage.DecodeStorage` and reads the compressed cache directly:
the fused Triton kernel on CUDA, its PyTorch twin elsewhere. Everything else (prefill, other
caches) is plain SDPA on the keys, values and mask it is given.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import reference, triton_available
from .storage import DecodeStorage, take_published

ATTENTION_NAME = "selkv"


# Whether Triton is installed, looked up once (an import-system lookup cannot be traced by torch.compile).
_TRITON = triton_available()
# The kernel module once imported. It is imported by an eager call (a prefill, or compile_decode_step),
# never inside a compiled region: importing is not something torch.compile traces.
_KERNELS = None


def kernel_module():
    """selkv's fused kernel module when it can run here (Triton installed), importing it outside compiled code."""
    global _KERNELS
    if _KERNELS is None and _TRITON and not torch.compiler.is_compiling():
        from .kernels import decode_attention_module

        _KERNELS = decode_attention_module()
    return _KERNELS


def _use_kernel(query: torch.Tensor, storage: DecodeStorage):
    """The kernel module if the fused kernel takes this step, else ``None`` (the PyTorch twin does)."""
    if not query.is_cuda:
        return None
    kernels = kernel_module()
    if kernels is None:
        return None
    head_dim = query.shape[-1]
    groups = query.shape[1] // storage.num_key_value_heads
    supported = kernels.check_supported(head_dim, groups, storage.nbits, storage.q_group_size, query.dtype) is None
    return kernels if supported else None


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
    layer = take_published(getattr(module, "layer_idx", None))
    if layer is None or query.shape[2] != 1:
        if query.is_cuda:
            kernel_module()  # import the kernels now (eagerly) for the decode steps that follow
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    storage = layer.decode_storage()
    kernels = _use_kernel(query, storage)
    if kernels is not None:
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

"""Every read of transformers that depends on its version or on private attributes, in one place.

selkv supports transformers from 5.17 to the newest release (the tested range is in the README).
Where releases differ, the difference is detected here from what the installed version does, not
from its version number, and the rest of selkv asks these functions:

- which decoder layers a config caches and their keyword arguments (:func:`layer_types_and_kwargs`);
- how many KV heads Falcon caches (:func:`falcon_num_key_value_heads`): up to 5.24 its attention
  broadcast the KV groups of the new decoder architecture to every head before caching them; from
  5.25 it goes through the attention interface and caches ``num_kv_heads`` heads;
- whether a model class routes its attention through ``AttentionInterface``
  (:func:`routes_through_attention_interface`), so that ``attn_implementation="selkv"`` reaches it;
- the name ``model.forward`` takes its cache under (:func:`cache_kwarg`) and whether it takes
  ``logits_to_keep`` (:func:`accepts_logits_to_keep`);
- the class ``AutoModelForCausalLM`` builds for a config (:func:`causal_lm_class_for`);
- the tensors a ``QuantizedCache`` layer holds (:func:`quantized_layer_tensors`);
- the attention a (text) config was loaded or set with (:func:`attention_implementation`).

``tests/test_upstream.py`` checks each answer against what the installed transformers really does.
"""

from __future__ import annotations

import functools
import importlib
import inspect


def layer_types_and_kwargs(config) -> tuple[list[str], list[dict]]:
    """Each decoder layer's type and cache-layer keyword arguments, as ``DynamicCache(config=...)`` reads them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    if isinstance(layer_kwargs, dict):  # transformers < 5.24: one set of keyword arguments for every layer
        layer_kwargs = [layer_kwargs] * len(layer_types)
    return list(layer_types), list(layer_kwargs)


@functools.cache
def _module_uses_attention_interface(module_name: str) -> bool:
    """Whether a modeling module dispatches its attention through ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    return hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def falcon_uses_attention_interface() -> bool:
    """Whether the installed Falcon goes through transformers' attention interface (5.25 and later)."""
    return _module_uses_attention_interface("transformers.models.falcon.modeling_falcon")


def falcon_num_key_value_heads(config) -> int:
    """The KV heads each Falcon layer caches under the installed transformers."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_kv_heads", None) or num_heads
    if config.new_decoder_architecture:
        # Before 5.25 the KV groups were broadcast to every query head before the cache saw them.
        return num_kv_heads if falcon_uses_attention_interface() else num_heads
    return 1 if config.multi_query else num_kv_heads


def routes_through_attention_interface(model_class, config=None) -> bool:
    """Whether ``model_class``'s attention calls the function ``attn_implementation`` names.

    ``_supports_attention_backend`` marks the models that do; Falcon does from 5.25 without the mark.
    ALiBi Falcon models pass their position bias inside the attention mask, which a decode kernel that
    reads only padding from the mask would drop, so they count as not routed.
    """
    if getattr(model_class, "_supports_attention_backend", False):
        return True
    if model_class.__module__.startswith("transformers.models.falcon."):
        return falcon_uses_attention_interface() and not getattr(config, "alibi", False)
    return False


def causal_lm_class_for(config):
    """The class ``AutoModelForCausalLM`` builds for ``config``, or ``None`` when it builds none."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        return None
    found = mapping[type(config)]
    return found[0] if isinstance(found, (list, tuple)) else found


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its cache under: ``cache`` from transformers 5.24, else ``past_key_values``."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can compute the logits of the last positions only (``logits_to_keep``)."""
    return "logits_to_keep" in _forward_parameters(type(model))


def quantized_layer_tensors(layer) -> tuple[object, object]:
    """``(keys, values)`` a transformers ``QuantizedLayer`` holds quantized (``None`` for other layers).

    quanto stores a packed tensor, HQQ a ``(codes, meta)`` pair.
    """
    return getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)


def attention_implementation(text_config) -> str | None:
    """The attention a model was loaded or set with (``"sdpa"``, ``"selkv"``...), as its config records it
    (a private attribute: ``attn_implementation`` is the requested one, not always the one set)."""
    return getattr(text_config, "_attn_implementation", None)

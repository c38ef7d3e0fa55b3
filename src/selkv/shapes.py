"""What a model config says about its cache: the decoder layers' types and windows, KV heads and head_dim."""

from __future__ import annotations

from .errors import SpecError
from .upstream import falcon_num_key_value_heads, layer_types_and_kwargs


def _text_config(config):
    if not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"selkv needs the model's config (model.config) to shape a cache, got {type(config).__name__}")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# Layer types whose cache keeps only the last ``sliding_window`` tokens (chunked attention caches like sliding).
SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def layer_plan(config) -> list[tuple[str, int | None]]:
    """Each decoder layer's ``(layer_type, sliding_window)``, read the way transformers' ``DynamicCache`` reads them.

    ``layer_type`` is ``"full_attention"`` (selkv's layers go there) or ``"sliding_attention"`` /
    ``"chunked_attention"`` (these keep transformers' sliding-window layer, which holds at most
    ``sliding_window`` tokens). Any other layer type (linear attention, shared KV, ...) is refused.
    """
    config = _text_config(config)
    try:
        layer_types, layer_kwargs = layer_types_and_kwargs(config)
    except AttributeError as err:  # e.g. sliding layers named in `layer_types` without a `sliding_window`
        raise SpecError(f"cannot read this model's layer types from its config: {err}") from None
    other = sorted({t for t in layer_types if t != "full_attention" and t not in SLIDING_LAYER_TYPES})
    if other or len(layer_types) != config.num_hidden_layers:
        found = ", ".join(other) or f"{len(layer_types)} cached of {config.num_hidden_layers}"
        raise SpecError(
            f"selkv caches take full-attention and sliding-window layers; this model also has {found} layers "
            "(use its own cache)"
        )
    return [
        (t, kwargs.get("sliding_window") if t in SLIDING_LAYER_TYPES else None)
        for t, kwargs in zip(layer_types, layer_kwargs, strict=True)
    ]


def _num_key_value_heads(config) -> int:
    """KV heads per cached layer, as the model's attention computes them before ``cache.update``."""
    num_heads = config.num_attention_heads
    if hasattr(config, "new_decoder_architecture"):  # Falcon: what it caches depends on the transformers release
        return falcon_num_key_value_heads(config)
    if getattr(config, "multi_query", False):  # GPT-BigCode-style multi-query attention
        return 1
    return getattr(config, "num_key_value_heads", None) or num_heads


def model_shape(config) -> dict:
    """num_hidden_layers, num_key_value_heads, head_dim and layer_types (see :func:`layer_plan`) of a decoder config."""
    layer_types = [layer_type for layer_type, _ in layer_plan(config)]
    config = _text_config(config)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": _num_key_value_heads(config),
        "head_dim": head_dim,
        "layer_types": layer_types,
    }

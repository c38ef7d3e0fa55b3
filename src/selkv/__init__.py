"""selkv: selective KV-cache quantization for Hugging Face transformers.

Keep the first ``sink`` tokens and a sliding window of recent tokens in 16-bit,
quantize every token in between once (8, 4 or 2 bits), read it back only inside
attention.
"""

from .attention import register_attention  # registers attn_implementation="selkv" with transformers
from .cache import SelectiveCache, kv_bytes, make_cache, model_shape
from .errors import SelKVError
from .generation import compile_decode_step
from .models import DEFAULT_MODEL, load_model, track_padding
from .specs import CacheSpec, SpecError, parse_spec

__version__ = "0.1.0"

__all__ = [
    "CacheSpec",
    "DEFAULT_MODEL",
    "SelKVError",
    "SelectiveCache",
    "SpecError",
    "compile_decode_step",
    "kv_bytes",
    "load_model",
    "make_cache",
    "model_shape",
    "parse_spec",
    "register_attention",
    "track_padding",
]

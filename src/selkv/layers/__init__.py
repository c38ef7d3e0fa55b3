"""Cache layer strategies, one per module."""

from .base import SelectiveLayer
from .evict import EvictLayer
from .sink_window import QuantizedSinkWindowLayer
from .static import StaticSinkWindowLayer

__all__ = ["SelectiveLayer", "EvictLayer", "QuantizedSinkWindowLayer", "StaticSinkWindowLayer"]

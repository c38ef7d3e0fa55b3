"""EvictLayer: the StreamingLLM-style baseline that keeps the sink and the window and drops the rest.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023
(https://arxiv.org/abs/2309.17453). Spec: ``drop:sink=S,window=W``.
"""

from __future__ import annotations

from .base import SelectiveLayer


class EvictLayer(SelectiveLayer):
    """Sink + window; tokens that leave the window are forgotten.

    One ``update`` returns the sink, the whole window as earlier calls left it and the call's own
    tokens, evicting only afterwards (as transformers' sliding-window layers return their previous
    window with a chunk): a chunk longer than the window still reads the end of the previous one.
    """

    retains_evicted = False
    # The kept positions are not contiguous, so transformers' padding mask (a slice of the 2D
    # attention mask) cannot describe them.
    supports_left_padding = False

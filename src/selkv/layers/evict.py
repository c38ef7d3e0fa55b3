"""EvictLayer: the StreamingLLM-style baseline that keeps the sink and the window and drops the rest.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023
(https://arxiv.org/abs/2309.17453). Spec: ``drop:sink=S,window=W``.
"""

from __future__ import annotations

import torch

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

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        # The first chunk's mask covers every position from 0: selkv's attention checks it for padding,
        # which later masks (a slice that misses the sink) could not show.
        self.checks_padding = self.cumulative_length == key_states.shape[-2]
        return keys, values

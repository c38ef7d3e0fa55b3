"""One process of the tensor-parallel test (tests/test_tensor_parallel.py), or the single-process run it is compared
with.

``python tests/tp_worker.py MODEL_DIR OUT_DIR`` loads the model in MODEL_DIR on CPU; under ``torchrun``
(``WORLD_SIZE`` set) with ``tp_plan="auto"``, so each rank holds half of the attention and key/value heads
and transformers joins the ranks through gloo. For every case it greedy-decodes a batch with a fresh
selkv cache (a chunked prefill, so the middle is quantized before the decode reads it) and writes
``OUT_DIR/rank{RANK}.json``: per case the new tokens, the key/value heads each cache layer holds and
``kv_bytes``. ``SELKV_TP_DEVICE=cuda`` puts the single process on the GPU too (the fused kernel then reads
each rank's storage).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import selkv
from selkv.generation import decode_tokens, prefill

PROMPT_LENGTH, NEW_TOKENS, CHUNK = 37, 16, 16
SPEC_8BIT = "quant:bits=8,sink=4,window=8,block=4"
# (name, spec, static, attention): the lossless `full` cache, and 8-bit quantization read by selkv's
# attention (the storage read in place, by the PyTorch twin of the kernel on CPU) and by sdpa (dequantized).
CASES = [
    ("full", "full", False, "selkv"),
    ("full static", "full", True, "selkv"),
    ("int8", SPEC_8BIT, False, "selkv"),
    ("int8 static", SPEC_8BIT, True, "selkv"),
    ("int8 sdpa", SPEC_8BIT, False, "sdpa"),
]


def layer_heads(layer) -> int | None:
    """Key/value heads a cache layer holds: selkv layers say so, transformers' layers hold ``keys``."""
    if hasattr(layer, "num_key_value_heads"):
        return layer.num_key_value_heads
    keys = getattr(layer, "keys", None)
    return None if keys is None else keys.shape[1]


@torch.inference_mode()
def main(model_dir: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    rank = int(os.environ.get("RANK", 0))
    parallel = {"tp_plan": "auto"} if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="selkv", **parallel
    )
    if not parallel:  # under torchrun transformers places each rank (on GPU `LOCAL_RANK` when it sees GPUs)
        model.to(os.environ.get("SELKV_TP_DEVICE", "cpu"))
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, model.config.vocab_size, (2, PROMPT_LENGTH), generator=generator).to(model.device)
    results = {"tp_size": getattr(model, "_tp_size", None) or 1, "cases": {}}
    for name, spec, static, attention in CASES:
        model.set_attn_implementation(attention)
        max_cache_len = PROMPT_LENGTH + NEW_TOKENS if static else None
        cache = selkv.make_cache(spec, model.config, max_cache_len=max_cache_len)
        last_logits = prefill(model, input_ids, cache, chunk=CHUNK)
        tokens, _ = decode_tokens(model, cache, last_logits, NEW_TOKENS)
        kv = selkv.kv_bytes(cache)
        results["cases"][name] = {
            "tokens": tokens.tolist(),
            "heads": [layer_heads(layer) for layer in cache.layers],
            "kv_bytes": {key: kv[key] for key in ("bytes_16bit", "bytes_codes", "bytes_scales", "full16")},
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])

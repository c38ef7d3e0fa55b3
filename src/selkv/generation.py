"""Greedy generation with a given cache spec, timed, with the cache's memory at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .cache import kv_bytes, make_cache
from .models import forward_with_cache


@dataclass
class Generation:
    cache: str
    text: str
    new_tokens: int
    prefill_s: float
    decode_s: float
    kv: dict

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else float("nan")


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> dict:
    """Tokenize ``prompt``; wrap it in the chat template when the tokenizer has one (or ``chat=True``)."""
    use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


@torch.inference_mode()
def generate(model, tokenizer, inputs: dict, spec: str, max_new_tokens: int) -> Generation:
    """Greedy-decode ``max_new_tokens`` after ``inputs`` with a fresh cache built from ``spec``.

    Prefill and decode are timed separately: the first new token comes from the prefill.
    """
    device = model.device
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs.get("attention_mask")
    attention_mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)
    cache = make_cache(spec, model.config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    eos = set(_as_list(model.generation_config.eos_token_id))
    start = time.perf_counter()
    out = forward_with_cache(model, cache, input_ids, attention_mask=attention_mask)
    next_token = out.logits[:, -1:].argmax(-1)
    sync()
    prefill_s = time.perf_counter() - start
    tokens = [next_token]
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if next_token.numel() == 1 and int(next_token) in eos:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        out = forward_with_cache(model, cache, next_token, attention_mask=attention_mask)
        next_token = out.logits[:, -1:].argmax(-1)
        tokens.append(next_token)
    sync()
    decode_s = time.perf_counter() - start
    generated = torch.cat(tokens, dim=-1)[0]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return Generation(str(spec), text, len(tokens), prefill_s, decode_s, kv_bytes(cache))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

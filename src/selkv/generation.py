"""Prefill, greedy decoding and timed generation with a given cache spec.

The one chunked prefill loop (:func:`prefill`) and the one greedy decode loop (:func:`decode_tokens`)
live here; ``generate``, the evaluation tasks and the tests all step the model through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .cache import kv_bytes, make_cache
from .errors import SelKVError
from .models import cache_kwarg, forward_with_cache
from .specs import CacheSpec
from .upstream import accepts_logits_to_keep


@dataclass
class Generation:
    cache: str
    text: str
    new_tokens: int
    prefill_s: float
    decode_s: float
    kv: dict

    timed_tokens: int = 0  # tokens the decode time covers (0: all of them)

    @property
    def decode_tok_s(self) -> float:
        steps = (self.timed_tokens or self.new_tokens) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> dict:
    """Tokenize ``prompt``; wrap it in the chat template when the tokenizer has one (or ``chat=True``)."""
    use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


# Decode steps of a compiled step that compile and capture it; left out of the decode time.
CAPTURE_STEPS = 2


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    inputs: dict,
    spec: str | CacheSpec,
    max_new_tokens: int,
    static: bool = False,
    label: str | None = None,
) -> Generation:
    """Greedy-decode ``max_new_tokens`` after ``inputs`` (one prompt) with a fresh cache built from ``spec`` (a spec
    string or a parsed spec; ``label``, the result's name, defaults to ``str(spec)``).

    Prefill and decode are timed separately: the first new token comes from the prefill. ``static``:
    the cache is preallocated for the prompt and the new tokens (``max_cache_len``) and, on CUDA, the
    decode step is compiled and replayed as a CUDA graph (:func:`compile_decode_step`); its first
    ``CAPTURE_STEPS`` steps (compilation) are left out of the decode time.
    """
    device = model.device
    input_ids = inputs["input_ids"].to(device)
    if input_ids.shape[0] != 1:
        raise SelKVError(f"generate takes one prompt, got a batch of {input_ids.shape[0]}")
    attention_mask = inputs.get("attention_mask")
    attention_mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)
    max_cache_len = input_ids.shape[-1] + max_new_tokens if static else None
    cache = make_cache(spec, model.config, max_cache_len=max_cache_len)
    step = compile_decode_step(model) if static and device.type == "cuda" and cache.is_compileable else None

    start = time.perf_counter()
    last_logits = prefill(model, input_ids, cache, attention_mask=attention_mask)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    starts = [time.perf_counter()]

    def step_done() -> None:  # times every step of a captured decode, to leave its compilation out
        synchronize(device)
        starts.append(time.perf_counter())

    tokens = greedy_decode(
        model,
        cache,
        last_logits,
        max_new_tokens,
        eos_token_ids(model, tokenizer),
        step=step,
        on_step=step_done if step else None,
    )
    synchronize(device)
    end = time.perf_counter()
    timed_tokens = len(tokens)
    if step is not None and len(starts) > CAPTURE_STEPS + 1:  # leave compilation and capture out
        starts, timed_tokens = starts[CAPTURE_STEPS:], len(tokens) - CAPTURE_STEPS
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    name = str(spec) if label is None else label
    name = f"{name} (static, captured)" if step else f"{name} (static)" if static else name
    return Generation(name, text, len(tokens), prefill_s, end - starts[0], kv_bytes(cache), timed_tokens)


def prefill(
    model,
    input_ids: torch.Tensor,
    cache,
    chunk: int = 0,
    attention_mask: torch.Tensor | None = None,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` ``[batch_size, seq_len]`` into ``cache`` in chunks of ``chunk`` tokens (0: one pass).

    Each chunk attends to the cache the earlier chunks left behind, so compressed tokens are read back
    as stored (a one-pass prefill lets every token see every other one exactly). ``attention_mask``
    ``[batch_size, seq_len]`` (left padding): each chunk gets its columns up to the chunk's end.
    ``on_logits(start, logits)`` sees every chunk's logits ``[batch_size, chunk_len, vocab_size]``;
    without it the model computes only each chunk's last position (``logits_to_keep=1``), so a long
    prompt never holds ``[batch_size, seq_len, vocab_size]`` logits.
    ``position_ids`` ``[batch_size, seq_len]`` (each row's positions counted from its first real token, as
    ``model.generate`` numbers a left-padded row): each chunk gets its columns; default, the model's own.
    Returns the last position's logits ``[batch_size, vocab_size]``, a tensor of their size alone.
    """
    seq_len = input_ids.shape[-1]
    chunk_len = chunk if chunk and chunk > 0 else seq_len
    keep = {"logits_to_keep": 1} if on_logits is None and accepts_logits_to_keep(model) else {}
    last = None
    for start in range(0, seq_len, chunk_len):
        end = start + chunk_len
        extra = {} if attention_mask is None else {"attention_mask": attention_mask[:, :end]}
        if position_ids is not None:
            extra["position_ids"] = position_ids[:, start:end]
        logits = forward_with_cache(model, cache, input_ids[:, start:end], **extra, **keep).logits
        if on_logits is not None:
            on_logits(start, logits)
        last = logits[:, -1]
    return None if last is None else last.clone()  # a view would keep the whole chunk's logits alive


def decode_tokens(
    model,
    cache,
    last_logits: torch.Tensor,
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    step: Callable[[torch.Tensor, object], torch.Tensor] | None = None,
    on_step: Callable[[], None] | None = None,
    feed_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy decode loop: tokens after a prefill, the first from ``last_logits`` ``[batch_size, vocab_size]``.

    Each token is fed back one step at a time. Stops after ``max_new_tokens`` tokens, or (batch size 1)
    after a token in ``eos_ids``. The last token is fed too when ``feed_last`` (fixed-length runs that
    measure the cache after every step: ``max_new_tokens`` steps); otherwise the loop ends without it
    (one step fewer, as text generation does).

    ``step``: a compiled step (:func:`compile_decode_step`) instead of the model's forward;
    ``on_step``: called after each step (timing, measuring).
    Returns ``(tokens [batch_size, new_tokens], logits [batch_size, vocab_size])``: the logits after the
    last step (``last_logits`` when there was none).
    """
    eos = set(eos_ids)
    if eos and last_logits.shape[0] != 1:
        raise SelKVError(f"stopping at EOS takes one sequence, got a batch of {last_logits.shape[0]}")
    tokens: list[torch.Tensor] = []
    logits = last_logits
    for _ in range(max_new_tokens):
        next_token = logits.argmax(-1, keepdim=True)  # [batch_size, 1]
        tokens.append(next_token)
        if (eos and int(next_token) in eos) or (len(tokens) == max_new_tokens and not feed_last):
            break
        logits = forward_with_cache(model, cache, next_token).logits[:, -1] if step is None else step(next_token, cache)
        if on_step is not None:
            on_step()
    if step is not None and logits is not last_logits:
        logits = logits.clone()  # a captured step's logits belong to its graph: the next replay overwrites them
    if not tokens:
        return last_logits.new_empty((last_logits.shape[0], 0), dtype=torch.long), logits
    return torch.cat(tokens, dim=1), logits


def greedy_decode(
    model, cache, last_logits: torch.Tensor, max_new_tokens: int, eos_ids: Iterable[int] = (), step=None, on_step=None
) -> list[int]:
    """Greedy token ids after a prefill of one sequence (batch size 1): :func:`decode_tokens` as a list.

    ``step``: a compiled step (:func:`compile_decode_step`) instead of the model's forward;
    ``on_step``: called after each step (timing).
    """
    tokens, _ = decode_tokens(model, cache, last_logits, max_new_tokens, eos_ids, step=step, on_step=on_step)
    return tokens[0].tolist()


def compile_decode_step(
    model,
    mode: str | None = "reduce-overhead",
    fullgraph: bool = True,
    backend: str = "inductor",
    plan_commits: bool = True,
):
    """A compiled one-token decode step for static caches:
    ``step(input_ids [batch, 1], cache) -> logits [batch, vocab]``.

    ``torch.compile(model, mode=mode, fullgraph=fullgraph)`` called with the cache and no positions or
    mask: positions come from the cache's device lengths, so every step has the same shapes and, with
    ``mode="reduce-overhead"`` on CUDA, replays one CUDA graph. Build the cache with ``max_cache_len``
    and run the prefill eagerly (``forward_with_cache``) first. The logits belong to the graph:
    use them (or clone them) before the next step.

    ``plan_commits``: before each step the cache decides on the host whether the step moves a block from
    the window to the middle (``SelectiveCache.plan_decode_step``), so the step has two compiled variants
    and quantizes each block once. ``False`` compiles one variant that quantizes the window's oldest block
    at every step and keeps it only on a commit (for comparison).
    """
    from .attention import kernel_module

    if model.device.type == "cuda":
        kernel_module()  # imported here: a compiled region cannot import it
    compiled = torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=False, backend=backend)
    name = cache_kwarg(model)

    def step(input_ids: torch.Tensor, cache) -> torch.Tensor:
        if not cache.is_compileable:
            raise SelKVError(
                "compile_decode_step needs a static selkv cache (make_cache(spec, config, max_cache_len=N)) "
                "and a model whose attention is 'selkv'"
            )
        if plan_commits:
            cache.plan_decode_step()
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():  # a decode step never needs gradients (the fused kernel has none)
            return compiled(input_ids=input_ids, use_cache=True, **{name: cache}).logits[:, -1]

    return step


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    ids = [i for i in ids if i is not None]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer read next covers it; nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

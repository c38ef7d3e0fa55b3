"""The lm-evaluation-harness model type ``selkv``: the harness's tasks, answered through a selkv cache.

A naive harness run never reads a compressed cache: ``loglikelihood`` is one forward pass over context +
continuation, where every token sees every other one exactly. Here every request gets a fresh cache built
from ``cache`` (a spec string, parsed once, or a spec object) and its tokens are fed in chunks of
``prefill_chunk`` tokens, as ``selkv eval perplexity`` feeds text (:func:`selkv.eval.perplexity.score_tokens`):
each chunk's predictions attend to the cache the earlier chunks left, so a continuation reads the compressed
middle as stored.
``prefill_chunk=0`` is one pass and says so in the results. ``generate_until`` prefills the same way and
decodes token by token through the cache (left-padded batches, stop sequences, greedy or sampled).

Python::

    import lm_eval, selkv
    from selkv.eval.harness_model import SelkvLM

    model, tokenizer = selkv.load_model("smollm2-135m")
    lm = SelkvLM(model=model, tokenizer=tokenizer, cache="quant:bits=4,sink=4,window=124", prefill_chunk=64)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"], limit=20)
    results["config"]["selkv"]   # the spec, the chunking and the KV bytes held, per task

Command line (lm-eval 0.4.13 finds no models through entry points, so ``selkv lm-eval`` registers this one
and runs the harness's own CLI with every flag unchanged; a spec has commas, so pass ``--model_args`` as JSON)::

    selkv lm-eval --model selkv --model_args '{"cache": "quant:bits=4,sink=4,window=124", "prefill_chunk": 64}' \\
        --tasks lambada_openai --limit 20 --device cpu
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

try:
    import lm_eval.models  # noqa: F401  the harness's own models: its registry imports them only while empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the CLI prints ImportErrors as one line
    raise ImportError(
        f"the lm-evaluation-harness model needs lm-eval ({err}); pip install 'selkv[harness]' (lm-eval==0.4.13)",
        name="lm_eval",
    ) from None

from ..cache import make_cache, resolve_spec
from ..errors import SelKVError
from ..generation import eos_token_ids, prefill
from ..models import DEFAULT_MODEL, EMBEDDED, forward_with_cache, load_model, resolve_model, track_padding
from ..specs import CacheSpec, parse_spec
from .kv_metrics import measure_cache
from .perplexity import score_tokens
from .runner import progress

MODEL_NAME = "selkv"
# selkv's offline task YAMLs (passed to the harness with --include_path).
TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"

# model_args keys (the harness adds batch_size, max_batch_size and device from its own flags).
MODEL_ARGS = (
    "pretrained",
    "cache",
    "prefill_chunk",
    "dtype",
    "attn",
    "device",
    "batch_size",
    "max_batch_size",
    "max_length",
    "max_gen_toks",
)
# Generation kwargs generate_until understands (the harness normalizes max_gen_toks and its aliases).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def chunking_label(prefill_chunk: int) -> str:
    """How requests are fed, for every result."""
    if prefill_chunk == 0:
        return "one pass: a continuation attends to its context exactly and never reads a compressed cache"
    return (
        f"chunks of {prefill_chunk} tokens from the first token of context + continuation; each chunk reads "
        f"the cache the earlier chunks left"
    )


def _count(name: str, value, minimum: int, allow_none: bool = False) -> int | None:
    """A model_args integer (the harness passes strings or numbers), checked, with a one-line error."""
    if value is None and allow_none:
        return None
    try:
        number = int(value)
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        raise SelKVError(f"selkv model_args {name}={value!r} is not an integer") from None
    if number < minimum:
        raise SelKVError(f"selkv model_args {name} must be >= {minimum}, got {number}")
    return number


def check_model_args(model_args: dict) -> None:
    """The input errors of ``--model_args`` that show without loading a model: unknown keys, a bad spec, a bad
    number, a local model path that is not there. ``selkv lm-eval`` calls it before the harness starts."""
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise SelKVError(f"unknown selkv model_args {', '.join(map(repr, unknown))}; allowed: {', '.join(MODEL_ARGS)}")
    cache = model_args.get("cache", "full")
    parse_spec(cache if isinstance(cache, CacheSpec) else str(cache))
    _count("prefill_chunk", model_args.get("prefill_chunk", 0), 0)
    batch_size = model_args.get("batch_size")
    _count("batch_size", 1 if batch_size is None else batch_size, 1)
    _count("max_length", model_args.get("max_length"), 2, allow_none=True)
    _count("max_gen_toks", model_args.get("max_gen_toks", 1), 1)
    pretrained = model_args.get("pretrained")
    if pretrained is not None and str(pretrained) not in EMBEDDED:
        resolve_model(str(pretrained))  # a local path that is no model folder fails here; Hub ids pass


def flag_values(argv: list[str], *flags: str) -> list[str] | None:
    """The words after the last of ``flags`` in ``argv`` (``--flag=value`` too), up to the next option; None if
    absent."""
    found = None
    for i, word in enumerate(argv):
        flag, eq, inline = word.partition("=")
        if flag in flags:
            found = [inline] if eq else []
            for value in argv[i + 1 :] if not eq else []:
                if value.startswith("-"):
                    break
                found.append(value)
    return found


def dict_argument(values: list[str] | None) -> dict:
    """A harness dict argument (``--model_args``, ``--metadata``) as the harness reads it: a JSON object, or
    ``key=value[,key=value]`` words."""
    from lm_eval.utils import simple_parse_args_string

    result = {}
    for value in values or []:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        result.update(parsed if isinstance(parsed, dict) else simple_parse_args_string(value))
    return result


def model_args_from_argv(argv: list[str]) -> tuple[str | None, dict]:
    """(``--model``, the ``--model_args`` dict) as the harness's command line will read them."""
    model = flag_values(argv, "--model", "-M")
    return (model[0] if model else None), dict_argument(flag_values(argv, "--model_args", "-a"))


@register_model(MODEL_NAME)
class SelkvLM(TemplateLM):
    """A causal LM whose every request runs through a fresh cache built from ``cache``.

    Give ``model`` and ``tokenizer`` (already loaded, e.g. by :func:`selkv.load_model`), or ``pretrained``
    (a name :func:`selkv.load_model` takes; default the embedded ``smollm2-135m``) with ``dtype``, ``attn``
    and ``device``. ``prefill_chunk``: tokens per forward call (0: one pass). ``batch_size``: prompts
    decoded together by ``generate_until`` (left-padded); likelihoods are scored one request at a time.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        tokenizer=None,
        cache: str | CacheSpec = "full",
        prefill_chunk: int = 64,
        dtype: str | None = None,
        attn: str = "sdpa",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **unknown,
    ) -> None:
        super().__init__()
        check_model_args(
            {
                "cache": cache,
                "prefill_chunk": prefill_chunk,
                "batch_size": batch_size,
                "max_length": max_length,
                "max_gen_toks": max_gen_toks,
                **unknown,
                **({"pretrained": pretrained} if pretrained is not None else {}),
            }
        )
        self.prefill_chunk = _count("prefill_chunk", prefill_chunk, 0)
        self.batch_size = _count("batch_size", 1 if batch_size is None else batch_size, 1)
        self._max_length = _count("max_length", max_length, 2, allow_none=True)
        self._max_gen_toks = _count("max_gen_toks", max_gen_toks, 1)
        if model is None:
            if tokenizer is not None:
                raise SelKVError("selkv model_args: tokenizer= needs model= (pretrained loads its own tokenizer)")
            self.model_name = str(pretrained or DEFAULT_MODEL)
            model, tokenizer = load_model(self.model_name, device=device, dtype=dtype, attn_implementation=attn)
        else:
            if tokenizer is None or pretrained is not None:
                raise SelKVError("give SelkvLM either model= and tokenizer= (loaded) or pretrained= (a name), not both")
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            track_padding(model)  # padding stays out of the sinks (load_model does it too)
        # Parsed once (a spec object is taken as it is) and checked against the model (head_dim, groups).
        self.spec = cache if isinstance(cache, CacheSpec) else parse_spec(str(cache))
        resolve_spec(self.spec, model.config)
        self.model, self.tokenizer, self.cache = model, tokenizer, str(cache)
        self._device = model.device
        self.kv_records: dict[str, list[dict]] = defaultdict(list)  # task -> KV memory of each request's cache
        self._tasks: list[str] | None = None

    # What the harness reads --------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's first prediction) conditions on: BOS, else EOS."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "selkv")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return list(self.tokenizer.encode(string))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """Added to the harness's ``results["config"]``: the spec, the chunking and the KV bytes held per task."""
        return {
            "selkv": {
                "model": self.model_name,
                "cache": self.cache,
                "prefill_chunk": self.prefill_chunk,
                "chunking": chunking_label(self.prefill_chunk),
                "dtype": str(self.model.dtype).replace("torch.", ""),
                "kv": self.kv_summary(),
            }
        }

    def kv_summary(self) -> dict[str, dict]:
        """Per task: requests, mean KV bytes held per sequence at each request's end (``kv_bytes``, storage
        really held), what a 16-bit full cache of the same tokens holds (``kv_bytes_full16``), their ratio."""
        summary = {}
        for task, records in self.kv_records.items():
            rows = sum(r["rows"] for r in records)
            held = sum(r["kv_bytes"] for r in records)
            full16 = sum(r["kv_bytes_full16"] for r in records)
            summary[task] = {
                "requests": rows,
                "kv_bytes": held / rows,
                "kv_bytes_full16": full16 / rows,
                "compression": full16 / held if held else 1.0,
                "max_tokens": max(r["kv_tokens"] for r in records),
            }
        return summary

    def _record(self, task: str | None, cache_kv: dict, rows: int = 1) -> None:
        self.kv_records[task or "unnamed"].append({**cache_kv, "rows": rows})

    # Likelihoods ------------------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._tasks = [request.task_name for request in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._tasks = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per request, in order, each scored on a fresh cache."""
        tasks = self._tasks if self._tasks is not None and len(self._tasks) == len(requests) else None
        results = []
        for i, (request, context, continuation) in enumerate(progress(requests, desc=f"loglikelihood ({self.cache})")):
            if not continuation or len(continuation) > self.max_length:
                raise SelKVError(
                    f"a continuation of {len(continuation)} tokens cannot be scored (max_length {self.max_length})"
                )
            ids = (context + continuation)[-(self.max_length + 1) :]  # too long: cut from the left, as HF does
            scored = score_tokens(
                self.model,
                ids,
                self.spec,
                self.prefill_chunk,
                first_target=len(ids) - len(continuation),
                feed_last=False,
            )
            self._record(tasks[i] if tasks else "loglikelihood", scored.kv)
            answer = (-scored.nll_sum, scored.greedy)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request: windows of ``max_length`` tokens (the first conditioned on the prefix
        token), each scored in chunks on a fresh cache, as ``selkv eval perplexity`` scores a segment."""
        results = []
        for request in progress(requests, desc=f"loglikelihood_rolling ({self.cache})"):
            (string,) = request.args
            total = 0.0
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                scored = score_tokens(
                    self.model,
                    context + continuation,
                    self.spec,
                    self.prefill_chunk,
                    first_target=len(context),
                    feed_last=False,
                )
                self._record(request.task_name, scored.kv)
                total -= scored.nll_sum
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # Generation -------------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text after each context, decoded through the cache until a stop sequence, EOS or ``max_gen_toks``.

        Requests with the same generation kwargs are batched (``batch_size``, left padding); caches that
        refuse left padding (``drop``) take the rows of a padded batch one at a time.
        """
        tasks = {id(request.args): request.task_name for request in requests}
        collator = Collator(
            [request.args for request in requests],
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
        )  # longest first
        texts = []
        bar = progress(total=len(requests), desc=f"generate_until ({self.cache})")
        for batch in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*batch, strict=True)
            settings = self._generation_settings(all_kwargs[0])
            keep = self.max_length - settings["max_gen_toks"]
            if keep < 1:
                raise SelKVError(
                    f"max_gen_toks {settings['max_gen_toks']} leaves no room for a context "
                    f"(max_length {self.max_length})"
                )
            prompts = [self.tok_encode(context)[-keep:] or [self.prefix_token_id] for context in contexts]
            task = tasks.get(id(batch[0])) or "generate_until"
            generated = self._generate(prompts, task, **settings)
            for context, kwargs, text in zip(contexts, all_kwargs, generated, strict=True):
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                texts.append(text)
                bar.update(1)
        bar.close()
        return collator.get_original(texts)

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS) - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
        if unknown:
            raise SelKVError(
                f"selkv generate_until does not take {', '.join(map(repr, unknown))}; it takes {', '.join(GEN_KWARGS)}"
            )
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        return {
            "until": handle_stop_sequences(kwargs.get("until"), eos=eos),
            "max_gen_toks": kwargs["max_gen_toks"],
            "do_sample": bool(kwargs.get("do_sample")),
            "temperature": float(kwargs.get("temperature") or 0.0),
            "top_k": kwargs.get("top_k"),
            "top_p": kwargs.get("top_p"),
        }

    def _generate(self, prompts: list[list[int]], task: str, **settings) -> list[str]:
        cache = make_cache(self.spec, self.model.config)
        padded = len({len(p) for p in prompts}) > 1
        if padded and not all(getattr(layer, "supports_left_padding", True) for layer in cache.layers):
            return [text for prompt in prompts for text in self._generate([prompt], task, **settings)]
        tokens = decode_batch(
            self.model,
            cache,
            prompts,
            self.prefill_chunk,
            settings["max_gen_toks"],
            eos_ids=eos_token_ids(self.model, self.tokenizer),
            stop=settings["until"],
            decode=self.tok_decode,
            pad_token_id=self._pad_token_id(),
            do_sample=settings["do_sample"],
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
        )
        self._record(task, measure_cache(cache), rows=len(prompts))
        return [postprocess_generated_text(self.tok_decode(row), settings["until"], None) for row in tokens]

    def _pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else self.eot_token_id


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """The next token of each row ``[batch_size, 1]`` from ``logits`` ``[batch_size, vocab_size]``: argmax, or a
    sample at ``temperature`` (1 when not positive) from the ``top_k`` tokens / the ``top_p`` nucleus."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < float(top_p) < 1:
        ordered, order = logits.sort(-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ahead of each token
        ordered = ordered.masked_fill(before > float(top_p), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(-1), 1)


@torch.inference_mode()
def decode_batch(
    model,
    cache,
    prompts: list[list[int]],
    chunk: int,
    max_new_tokens: int,
    eos_ids=(),
    stop=(),
    decode=None,
    pad_token_id: int = 0,
    **sampling,
) -> list[list[int]]:
    """New tokens for each prompt, decoded together through ``cache`` (left padding, each row's positions
    counted from its first real token, as ``model.generate`` numbers them).

    The prompts are fed in chunks of ``chunk`` tokens (:func:`selkv.generation.prefill`), then one token per
    step. A row stops at a token in ``eos_ids`` (kept), or once ``decode(row)`` contains a string of ``stop``;
    the batch stops when every row has or after ``max_new_tokens``. ``sampling``: :func:`next_tokens`'s.
    """
    device = model.device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [batch_size, width]
    logits = prefill(model, input_ids, cache, chunk, attention_mask=attention_mask, position_ids=position_ids)
    eos, stop = set(eos_ids), [s for s in stop if s]
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    positions = position_ids[:, -1:]
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, **sampling)  # [batch_size, 1]
        for row, token in enumerate(chosen[:, 0].tolist()):
            if done[row]:
                continue
            rows[row].append(token)
            done[row] = token in eos or bool(stop and decode and any(s in decode(rows[row]) for s in stop))
        if all(done) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=-1)
        positions = positions + 1
        logits = forward_with_cache(model, cache, chosen, attention_mask=attention_mask, position_ids=positions).logits[
            :, -1
        ]
    return rows

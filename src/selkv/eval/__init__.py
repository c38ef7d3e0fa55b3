"""selkv's evaluation suite: one module per metric, each with ``run(model, tokenizer, specs, writer, **settings)``.

Tasks: ``perplexity`` (chunked, reads the compressed cache), ``rouge`` (summarization), ``needle`` (passkey
and key-value retrieval), ``memory`` (KV bytes vs tokens), ``speed`` (prefill/decode tokens/s).
Plumbing: ``results`` (the resumable results writer), ``runner`` (``run_task``), ``kv_metrics`` (KV-memory
fields of a record), ``prompts`` (prompt ids), ``data`` (data sets), ``profile`` (torch.profiler),
``report`` (Markdown + plots), ``suite`` (the default cache sets and suites).
The model is stepped by :func:`selkv.generation.prefill` and :func:`selkv.generation.decode_tokens`.
"""

from .results import ResultsWriter
from .runner import run_task

__all__ = ["ResultsWriter", "run_task"]

"""selkv's evaluation suite: one module per metric, each with ``run(model, tokenizer, specs, writer, **settings)``.

``perplexity`` (chunked, reads the compressed cache), ``rouge`` (summarization), ``needle`` (passkey and
key-value retrieval), ``memory`` (KV bytes vs tokens), ``speed`` (prefill/decode tokens/s), ``profile``
(torch.profiler), ``report`` (Markdown + plots); ``common`` holds the resumable results writer.
"""

from .common import ResultsWriter, run_task

__all__ = ["ResultsWriter", "run_task"]

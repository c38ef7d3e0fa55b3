"""Deprecated: ``selkv.eval.common`` was split by concern; its names still resolve, with a DeprecationWarning.

Results I/O: :mod:`selkv.eval.results`; KV-memory fields: :mod:`selkv.eval.kv_metrics`; prompt ids:
:mod:`selkv.eval.prompts`; the task runner: :mod:`selkv.eval.runner`; prefill and greedy decoding:
:mod:`selkv.generation`.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    **dict.fromkeys(("RESULTS", "EXAMPLES", "SettingsMismatch", "ResultsWriter", "write_json_atomic"), "selkv.eval.results"),
    **dict.fromkeys(("measure_cache", "aggregate_kv"), "selkv.eval.kv_metrics"),
    **dict.fromkeys(("encode", "chat_ids"), "selkv.eval.prompts"),
    **dict.fromkeys(("run_task", "environment", "maybe_profile", "progress"), "selkv.eval.runner"),
    **dict.fromkeys(("prefill", "greedy_decode", "eos_token_ids"), "selkv.generation"),
}
_RENAMED = {"sync": ("selkv.generation", "synchronize")}


def __getattr__(name: str):
    if name in _MOVED or name in _RENAMED:
        module, new_name = _RENAMED.get(name, (_MOVED.get(name), name))
        warnings.warn(f"selkv.eval.common.{name} is deprecated; use {module}.{new_name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(module), new_name)
    if name == "spec_label":
        raise AttributeError("selkv.eval.common.spec_label was removed; use str(spec)")
    raise AttributeError(f"module 'selkv.eval.common' has no attribute {name!r}")

"""Deprecated: the ``eval`` and ``report`` subcommands live in :mod:`selkv.cli`; the default cache sets, the
suites and ``demo_comparison`` in :mod:`selkv.eval.suite`. Those names still resolve here, with a
DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings

_SUITE = ("TASKS", "DEFAULT_CACHES", "SUITE", "QUICK", "run_suite", "demo_comparison")
_CLI = ("add_commands", "cmd_eval", "cmd_eval_all", "cmd_report", "EVAL_EPILOG", "REPORT_EPILOG")


def __getattr__(name: str):
    if name in _SUITE:
        warnings.warn(f"selkv.eval.cli.{name} is deprecated; use selkv.eval.suite.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module("selkv.eval.suite"), name)
    if name in _CLI:  # the evaluation package does not import the command line (it sits above it)
        new = "add_eval_commands" if name == "add_commands" else name
        raise ImportError(f"selkv.eval.cli.{name} moved to selkv.cli.{new}", name=__name__)
    raise AttributeError(f"module 'selkv.eval.cli' has no attribute {name!r}")

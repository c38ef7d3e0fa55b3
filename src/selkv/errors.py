"""Errors for input that selkv cannot use; the CLI prints them as one line without a traceback."""

from __future__ import annotations


class SelKVError(ValueError):
    """A model, device, file, prompt or setting that selkv cannot use.

    The message says what was wrong and what to do instead. It subclasses ``ValueError`` so that
    callers catching ``ValueError`` for bad arguments keep working.
    """


class ModelNotFoundError(SelKVError):
    """A model name or path that names no loadable causal language model (or its tokenizer)."""


class UnsupportedModelError(SelKVError):
    """A model that exists but cannot run the requested way (e.g. ``attn_implementation="selkv"``)."""


class DeviceError(SelKVError):
    """A device string torch does not know, or a device this machine does not have."""


class SpecError(ValueError):
    """A cache spec string or value that cannot be used."""

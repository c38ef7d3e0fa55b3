"""Errors for input that selkv cannot use; the CLI prints them as one line without a traceback.

Every deliberate check on what a user gave (a spec, a model, a file, a count, a batch) raises a
:class:`SelKVError`; anything else that escapes is a bug and keeps its traceback.

- :class:`SpecError`: a cache spec string or value;
- :class:`ModelNotFoundError`, :class:`UnsupportedModelError`: a model;
- :class:`DeviceError`: a device;
- :class:`CapacityError`: a static cache's capacity or batch size;
- :class:`UnsupportedInputError`: a batch or call a cache cannot serve (left padding, cropping);
- ``selkv.eval.data.DataError`` and ``selkv.eval.results.SettingsMismatch``: evaluation data and folders.
"""

from __future__ import annotations


class SelKVError(ValueError):
    """A model, device, file, prompt or setting that selkv cannot use.

    The message says what was wrong and what to do instead. It subclasses ``ValueError`` so that
    callers catching ``ValueError`` for bad arguments keep working.
    """


class SpecError(SelKVError):
    """A cache spec string or value that cannot be used."""


class ModelNotFoundError(SelKVError):
    """A model name or path that names no loadable causal language model (or its tokenizer)."""


class UnsupportedModelError(SelKVError):
    """A model that exists but cannot run the requested way (e.g. ``attn_implementation="selkv"``)."""


class DeviceError(SelKVError):
    """A device string torch does not know, or a device this machine does not have."""


class CapacityError(SelKVError):
    """More positions than a static cache was built for, or a batch of another size than it holds."""


class UnsupportedInputError(SelKVError, NotImplementedError):
    """A batch or call that a cache cannot serve (left padding where tokens are dropped, cropping a
    quantized cache). Also a ``NotImplementedError``, as transformers' caches raise for what they lack."""

"""Cache specifications, kept importable from here: they live in :mod:`selkv.specs`, one module per kind."""

from __future__ import annotations

from .specs import (
    DEFAULT_BLOCK,
    DEFAULT_GROUP,
    DEFAULT_KEY_AXIS,
    KINDS,
    MAX_SETTING,
    CacheSpec,
    SpecError,
    parse_spec,
)

__all__ = [
    "DEFAULT_BLOCK", "DEFAULT_GROUP", "DEFAULT_KEY_AXIS", "KINDS", "MAX_SETTING", "CacheSpec", "SpecError", "parse_spec",
]

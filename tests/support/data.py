"""The shared evaluation data, found where selkv looks for it (``$SELKV_DATA``, else ``../shared/data``)."""

from __future__ import annotations

from selkv.eval.data import TEXT_SETS, data_root

# read once, as the skip marker reads it (a test that sets SELKV_DATA later does not move it)
DATA_ROOT = data_root()
SHARED_DATA_MISSING = (
    None
    if DATA_ROOT.is_dir()
    else (f"needs the evaluation sets in {DATA_ROOT} (SELKV_DATA, else ../shared/data), which this machine lacks")
)


def read_book(chars: int = 20000) -> str:
    """The first ``chars`` characters of the PG-19 test book (selkv's named text set 'pg19')."""
    with open(DATA_ROOT / TEXT_SETS["pg19"][0], encoding="utf-8") as f:
        return f.read()[:chars]

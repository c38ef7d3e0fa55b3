"""The GPU benchmark scripts, run small on CPU so that they cannot rot between GPU sessions.

The numbers they print here mean nothing (a tiny model on CPU); what is checked is that each
script runs end to end and writes the results it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.path.join(BENCHMARKS, "..", "src"), SELKV_NO_PROGRESS="1")
    subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], check=True, env=env,
                   capture_output=True, text=True, timeout=600)


def test_speedup_is_the_median_of_paired_rounds():
    from decode_e2e import speedup

    full = dict(rounds=3, round_tokens_per_s=[100.0, 50.0, 80.0], tokens_per_s=80.0)
    row = dict(rounds=3, round_tokens_per_s=[300.0, 100.0, 200.0], tokens_per_s=200.0)
    assert speedup(row, full) == pytest.approx(2.5)  # ratios 3.0, 2.0, 2.5: the median
    alone = dict(rounds=1, round_tokens_per_s=[40.0], tokens_per_s=40.0)
    assert speedup(alone, full) == pytest.approx(0.5)  # not paired: ratio of medians


def test_decode_e2e_runs_small(tmp_path):
    out = tmp_path / "e2e.json"
    _run("decode_e2e.py", "--tiny", "--batch", "2", "--context", "300", "--steps", "3", "--rounds", "3",
         "--reference-steps", "2", "--extra", "quant:bits=4,sink=4,window=124,key_axis=token", "--out", str(out))
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "full" and len(names) == 5 and any("reference" in n for n in names)
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and 0 < row["host_ms_per_step"] <= row["ms_per_step"] * 1.01
        assert len(row["round_tokens_per_s"]) == row["rounds"] == (1 if "reference" in row["name"] else 3)
        assert row["kv_gib"] > 0
    assert result["rows"][0]["speedup_vs_full"] == 1.0


def test_profile_e2e_runs_small(tmp_path):
    _run("profile_e2e.py", "--tiny", "--batch", "2", "--context", "300", "--steps", "2", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["caches"]) == {"full", "int8", "int4"}
    for name, cache in summary["caches"].items():
        assert cache["wall_ms_per_step"] > 0 and cache["python_ms_per_step"] > 0
        assert (tmp_path / f"python_{name}.txt").read_text().startswith(f"{name}: ")
        assert (tmp_path / f"trace_{name}.json.gz").exists()

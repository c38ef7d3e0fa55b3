"""Evaluation suite: chunked scoring reads the cache, resume, input errors, report.

A tiny random Llama with a byte-level tokenizer stand-in covers the logic; tests marked slow use the
embedded model and stay short.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.data import read_book
from support.markers import needs_rouge, needs_shared_data
from support.models import make_tiny_llama
from support.tolerances import TOLERANCES

from selkv.eval import memory, needle, perplexity, report, rouge, speed
from selkv.eval.data import DataError, read_jsonl
from selkv.eval.prompts import encode
from selkv.eval.results import ResultsWriter, SettingsMismatch
from selkv.eval.runner import run_task
from selkv.generation import eos_token_ids

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light. "
) * 8


class ByteTokenizer:
    """A tokenizer stand-in: one token per UTF-8 byte (the tiny Llama has 256 ids; 0-2 are special)."""

    eos_token_id = 2
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if int(i) > 2).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(), ByteTokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize(
    "lossless", ["quant:bits=4,sink=4,window=512", "quant:bits=2,sink=0,window=400,block=8", "drop:sink=4,window=512"]
)
def test_lossless_cache_scores_exactly_like_full(tiny, lossless, chunk):
    model, tok = tiny
    ids = tok.encode(TEXT)[:300]
    full_nll, tokens, _ = perplexity.score(model, ids, "full", chunk)
    nll, tokens2, kv = perplexity.score(model, ids, lossless, chunk)
    assert tokens == tokens2 == 299
    assert kv["kv_bytes_codes"] == 0  # nothing left the window: nothing quantized or dropped
    torch.testing.assert_close(torch.tensor(nll), torch.tensor(full_nll), **TOLERANCES["lossless_fp32"])


def test_chunked_full_matches_one_forward_pass(tiny):
    model, tok = tiny
    ids = tok.encode(TEXT)[:200]
    nll_chunked, _, _ = perplexity.score(model, ids, "full", 32)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum")
    torch.testing.assert_close(torch.tensor(nll_chunked, dtype=torch.float32), reference, **TOLERANCES["kernel_fp32"])


def test_chunks_read_the_compressed_cache(tiny):
    """A lossy cache must change the score when chunks attend to it (a one-pass score never would)."""
    model, tok = tiny
    ids = tok.encode(TEXT)[:300]
    full, _, _ = perplexity.score(model, ids, "full", 16)
    lossy, _, kv = perplexity.score(model, ids, "quant:bits=2,sink=0,window=0,block=8", 16)
    dropped, _, _ = perplexity.score(model, ids, "drop:sink=4,window=16,block=8", 16)
    assert kv["kv_bytes_codes"] > 0
    assert lossy != full and dropped != full


def _ppl_settings(text_file, segments=4):
    return {"data": text_file, "max_tokens": 96, "chunk": 32, "segments": segments}


SPECS = ["full", "quant:bits=4,sink=4,window=16,block=8", "drop:sink=4,window=16,block=8"]


def test_resume_after_interruption_gives_same_results(tiny, text_file, tmp_path, monkeypatch):
    model, tok = tiny
    settings = _ppl_settings(text_file)
    reference = run_task(perplexity, model, tok, "tiny", SPECS, str(tmp_path / "ref"), settings)

    real_score, calls = perplexity.score, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(perplexity, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_task(perplexity, model, tok, "tiny", SPECS, str(out), settings)
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    assert len((out / "examples.jsonl").read_text().splitlines()) == 5
    # A torn last line (killed mid-write) is dropped on resume.
    with open(out / "examples.jsonl", "a") as f:
        f.write('{"cache": "full", "key": "segm')

    monkeypatch.setattr(perplexity, "score", real_score)
    calls["n"] = 0
    final = run_task(perplexity, model, tok, "tiny", SPECS, str(out), settings)
    lines = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(lines) == len(SPECS) * 4
    assert len({(r["cache"], r["key"]) for r in lines}) == len(lines)  # no duplicates
    assert final["complete"] is True
    assert final["results"] == reference["results"]
    metrics = {r["cache"]: r["metrics"] for r in final["results"]}
    assert set(metrics["full"]) >= {"ppl", "nll", "tokens", "kv_bytes", "kv_bytes_full16", "compression"}
    assert metrics["full"]["ppl_vs_full"] == 0.0
    assert math.isclose(metrics["full"]["ppl"], math.exp(metrics["full"]["nll"]))


def test_resume_refuses_different_settings(tiny, text_file, tmp_path):
    model, tok = tiny
    run_task(perplexity, model, tok, "tiny", ["full"], str(tmp_path), _ppl_settings(text_file, 1))
    with pytest.raises(SettingsMismatch, match="settings"):
        run_task(perplexity, model, tok, "tiny", ["full"], str(tmp_path), _ppl_settings(text_file, 2))


def test_resume_refuses_a_spec_whose_defaults_changed(tiny, text_file, tmp_path, monkeypatch):
    """A folder written when a default-spelled spec meant another cache is refused, not mixed with the new one."""
    from selkv.specs import quant as quant_spec

    model, tok = tiny
    spec = "quant:bits=4,sink=4,window=16"
    first = run_task(perplexity, model, tok, "tiny", [spec, "full"], str(tmp_path), _ppl_settings(text_file, 1))
    assert first["resolved"][spec].startswith(spec + ",") and first["resolved"]["full"] == "full"
    run_task(perplexity, model, tok, "tiny", ["full"], str(tmp_path), _ppl_settings(text_file, 1))  # same: resumes
    monkeypatch.setitem(quant_spec.DEFAULT_BLOCK, 4, 2 * quant_spec.DEFAULT_BLOCK[4])
    with pytest.raises(SettingsMismatch, match=r"cache 'quant:bits=4,sink=4,window=16' now resolves to .*block=128"):
        run_task(perplexity, model, tok, "tiny", [spec], str(tmp_path), _ppl_settings(text_file, 1))
    # a folder written before the names' resolutions were recorded resumes unchecked, and is not vouched for
    payload = json.loads((tmp_path / "results.json").read_text())
    del payload["resolved"]
    (tmp_path / "results.json").write_text(json.dumps(payload))
    resumed = run_task(perplexity, model, tok, "tiny", [spec], str(tmp_path), _ppl_settings(text_file, 1))
    assert spec not in resumed.get("resolved", {})


def test_resume_refuses_a_change_of_the_layers_a_rule_widens(tiny, text_file, tmp_path, monkeypatch):
    """The canonical string leaves the later-layer rule's layers to the rule: a new share is a new cache too."""
    from fractions import Fraction

    from selkv.specs import quant as quant_spec

    model, tok = tiny
    spec = "quant:bits=2,sink=4,window=16,block=8"
    first = run_task(perplexity, model, tok, "tiny", [spec], str(tmp_path), _ppl_settings(text_file, 1))
    assert first["resolved"][spec].endswith(" late_layers=0,1")
    monkeypatch.setitem(quant_spec.LATE_SHARE, 2, Fraction(0))
    with pytest.raises(SettingsMismatch, match="now resolves to"):
        run_task(perplexity, model, tok, "tiny", [spec], str(tmp_path), _ppl_settings(text_file, 1))


def test_resume_checks_only_names_with_finished_examples(tmp_path):
    def writer(resolved):
        return ResultsWriter(tmp_path, "t", "m", {}, ["a", "b"], lambda r: {}, resolved=resolved)

    writer({"a": "old a", "b": "old b"}).add("a", "0", {"x": 1.0})
    assert writer({"a": "old a", "b": "new b"}).resolved == {"a": "old a", "b": "new b"}  # b never finished one
    with pytest.raises(SettingsMismatch, match="cache 'a' now resolves to 'new a'"):
        writer({"a": "new a", "b": "new b"})
    payload = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**payload, "resolved": ["not", "an", "object"]}))
    with pytest.raises(SettingsMismatch, match="'resolved' is not an object"):
        writer({"a": "old a"})


def test_results_json_is_replaced_atomically(tmp_path):
    writer = ResultsWriter(tmp_path, "t", "m", {}, ["full"], lambda records: {"n": len(records)})
    writer.add("full", "a", {"x": 1.0, "y": float("nan")})
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["results"] == [{"cache": "full", "metrics": {"n": 1}}]
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    assert json.loads((tmp_path / "examples.jsonl").read_text())["y"] is None


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"document": "a", "summary": "b"}\n\n{"document": "c", "summary": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:3: malformed JSON"):
        read_jsonl(path, required=("document", "summary"))
    path.write_text('{"document": "a", "summary": "b"}\n{"document": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:2: missing field 'summary'"):
        read_jsonl(path, required=("document", "summary"))
    path.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:1: expected a JSON object"):
        read_jsonl(path)


def test_harness_metadata_is_one_json_object():
    from selkv.eval.harness import _metadata

    assert _metadata(None) == {} and _metadata('{"data_file": "x.jsonl"}') == {"data_file": "x.jsonl"}
    with pytest.raises(DataError, match=r"--metadata '\[1\]': expected a JSON object, got list"):
        _metadata("[1]")
    with pytest.raises(DataError, match="--metadata '{x': malformed JSON"):
        _metadata("{x")


def test_unknown_named_set_is_reported():
    from selkv.eval.data import load_text

    with pytest.raises(FileNotFoundError, match="named sets: wikitext2"):
        load_text("no-such-set")


@pytest.fixture
def summaries(tmp_path):
    path = tmp_path / "sum.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(2):
            f.write(
                json.dumps({"id": f"d{i}", "document": TEXT[i * 50 : i * 50 + 300], "summary": "the age of wisdom"})
            )
            f.write("\n")
    return str(path)


@needs_rouge
def test_summarization_metrics(tiny, summaries, tmp_path):
    model, tok = tiny
    settings = {**rouge.DEFAULTS, "data": summaries, "limit": 2, "max_new_tokens": 6, "chunk": 32}
    specs = ["quant:bits=4,sink=4,window=512", "full", "drop:sink=4,window=16,block=8"]
    payload = run_task(rouge, model, tok, "tiny", specs, str(tmp_path / "sum"), settings)
    metrics = {r["cache"]: r["metrics"] for r in payload["results"]}
    assert metrics["full"]["n"] == 2 and metrics["full"]["rougeL_vs_full"] == 1.0
    assert metrics["full"]["token_match_vs_full"] == 1.0
    # Lossless: identical tokens to full.
    assert metrics["quant:bits=4,sink=4,window=512"]["token_match_vs_full"] == 1.0
    for m in metrics.values():
        assert {"rougeL", "rougeL_vs_full", "token_match_vs_full", "n", "kv_bytes", "compression"} <= set(m)


@needs_shared_data  # the needle's default haystack essays and the named set pg19
def test_needle_memory_speed_and_report(tiny, tmp_path):
    model, tok = tiny
    specs = ["full", "quant:bits=8,sink=4,window=32,block=8", "drop:sink=4,window=32,block=8"]
    needle_settings = {**needle.DEFAULTS, "lengths": [512], "depths": [0.2, 0.9], "trials": 1, "chunk": 32}
    out = tmp_path / "suite"
    payload = run_task(needle, model, tok, "tiny", specs, str(out / "needle"), needle_settings)
    m = payload["results"][0]["metrics"]
    assert m["n"] == 2 and set(m["by_length"]) == {"512"} and set(m["by_depth"]) == {"0.2", "0.9"}
    prompt = needle.passkey_examples(tok, [512], [0.5], 1, 0, None)[0]["prompt"]
    assert len(prompt) == 512

    mem_settings = {**memory.DEFAULTS, "data": "pg19", "prompt_tokens": 64, "new_tokens": 24, "every": 8, "chunk": 32}
    payload = run_task(memory, model, tok, "tiny", specs, str(out / "memory"), mem_settings)
    series = payload["results"][1]["metrics"]["series"]
    assert [p["new_tokens"] for p in series] == [0, 8, 16, 24] and series[-1]["tokens"] == 88
    full = payload["results"][0]["metrics"]
    assert full["kv_bytes"] == 2 * full["kv_bytes_full16"]  # the tiny model is float32; full16 counts 2 bytes

    speed_settings = {**speed.DEFAULTS, "context": 32, "new_tokens": 4, "repeats": 2, "warmup": 1}
    payload = run_task(speed, model, tok, "tiny", specs[:2], str(out / "speed"), speed_settings)
    assert all(r["metrics"]["decode_tok_s"] > 0 and len(r["metrics"]["decode_s"]) == 2 for r in payload["results"])

    ppl_dir = out / "ppl"
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    run_task(perplexity, model, tok, "tiny", specs, str(ppl_dir), {**_ppl_settings(str(text), 1)})
    markdown = report.run([str(out)], str(tmp_path / "report"))
    assert "### Perplexity" in markdown and "### Needle" in markdown and "| `full` |" in markdown
    for name in ("memory_vs_tokens", "ppl_vs_bits", "needle_accuracy_vs_depth"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_profile_writes_trace_and_tables(tiny, text_file, tmp_path):
    model, tok = tiny
    run_task(
        perplexity,
        model,
        tok,
        "tiny",
        ["full"],
        str(tmp_path / "r"),
        _ppl_settings(text_file, 1),
        profile_dir=str(tmp_path / "prof"),
    )
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    assert "By self time" in (tmp_path / "prof" / "top_operators.md").read_text()


@pytest.mark.slow
@needs_shared_data  # a PG-19 book
def test_embedded_model_int8_is_near_full(smollm):
    model, tok = smollm
    ids = encode(tok, read_book(6000))[:384]
    full, _, _ = perplexity.score(model, ids, "full", 64)
    int8, _, kv = perplexity.score(model, ids, "quant:bits=8,sink=4,window=124", 64)
    dropped, _, _ = perplexity.score(model, ids, "drop:sink=4,window=124", 64)
    assert kv["kv_bytes_codes"] > 0
    assert abs(math.exp((int8 - full) / 383) - 1) < 0.005
    assert dropped > int8


@pytest.mark.slow
@needs_shared_data  # the haystack essays
def test_embedded_model_finds_the_needle_with_full_cache(smollm):
    model, tok = smollm
    example = needle.passkey_examples(tok, [768], [0.3], 1, 0, None)[0]
    eos = eos_token_ids(model, tok)
    out = needle.answer(model, tok, example["prompt"], "full", 64, needle.PASSKEY_NEW_TOKENS, eos)
    assert example["answer"] in out["output"]
    evicted = needle.answer(model, tok, example["prompt"], "drop:sink=4,window=124", 64, needle.PASSKEY_NEW_TOKENS, eos)
    assert example["answer"] not in evicted["output"]


def test_report_names_the_default_group_each_spec_got(text_file, tmp_path):
    # head_dim 48: the per-bit default group (32 at 4 bits) does not divide it; gcd(48, 32) = 16 does.
    model, tok = make_tiny_llama(head_dim=48), ByteTokenizer()
    specs = ["full", "quant:bits=4,sink=4,window=32", "quant:bits=8,group=16"]
    payload = run_task(perplexity, model, tok, "tiny", specs, str(tmp_path / "ppl"), _ppl_settings(text_file, 1))
    assert payload["default_groups"] == {"quant:bits=4,sink=4,window=32": 16}
    markdown = report.run([str(tmp_path / "ppl")], str(tmp_path / "report"))
    assert "default groups: `quant:bits=4,sink=4,window=32` 16" in markdown

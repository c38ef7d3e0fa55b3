"""The lm-evaluation-harness model type 'selkv': chunked likelihoods read the cache, generation decodes through it.

A tiny random Llama with a one-character-per-token tokenizer covers the logic; the command line runs the
harness itself. Skipped where lm-eval is not installed (pip install 'selkv[harness]').
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.markers import needs_embedded_model, needs_shared_data
from support.models import make_tiny_llama
from support.tolerances import TOLERANCES

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'selkv[harness]')")

from lm_eval.api.instance import Instance  # noqa: E402

from selkv.errors import SelKVError  # noqa: E402
from selkv.eval import perplexity  # noqa: E402
from selkv.eval.harness_model import SelkvLM  # noqa: E402
from selkv.eval.runner import run_task  # noqa: E402
from selkv.generation import generate  # noqa: E402
from selkv.specs import SpecError  # noqa: E402

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light. "
) * 2

LOSSLESS = "quant:bits=4,sink=4,window=512"  # nothing leaves the window at these lengths
INT2 = "quant:bits=2,sink=0,window=0,block=8"


class CharTokenizer:
    """A tokenizer stand-in: one token per character (ids 3-255); 0 pads, 1 is BOS, 2 is EOS."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name_or_path = "chars"
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids if int(i) > 2 or not skip_special_tokens)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(), CharTokenizer()


def lm(tiny, cache="full", prefill_chunk=32, **kwargs) -> SelkvLM:
    model, tok = tiny
    return SelkvLM(model=model, tokenizer=tok, cache=cache, prefill_chunk=prefill_chunk, **kwargs)


def request(kind: str, *args, task: str = "t") -> Instance:
    return Instance(kind, {}, tuple(args), 0, metadata=(task, 0, 1))


def test_rolling_perplexity_of_full_equals_selkv_eval_perplexity(tiny, tmp_path):
    """The harness's perplexity (loglikelihood_rolling) is `selkv eval perplexity` on the same tokens and chunks."""
    model, tok = tiny
    harness = lm(tiny, "full", prefill_chunk=32)
    logprob = harness.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)])[0]
    harness_ppl = math.exp(-logprob / len(TEXT))
    # The same text behind the prefix token the harness conditions the first token on (id 1 = chr(1)).
    path = tmp_path / "text.txt"
    path.write_text(chr(harness.prefix_token_id) + TEXT, encoding="utf-8")
    settings = {"data": str(path), "max_tokens": len(TEXT) + 1, "chunk": 32, "segments": 1}
    payload = run_task(perplexity, model, tok, "tiny", ["full"], str(tmp_path / "ppl"), settings)
    metrics = payload["results"][0]["metrics"]
    assert metrics["tokens"] == len(TEXT)
    selkv_ppl = metrics["ppl"]
    assert abs(harness_ppl / selkv_ppl - 1) < 1e-4


def test_rolling_windows_cover_every_token_once(tiny):
    """A text longer than max_length is scored in windows, each on a fresh cache; every token is predicted once."""
    harness = lm(tiny, "full", prefill_chunk=32, max_length=100)
    harness.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)])
    records = harness.kv_records["t"]
    assert len(records) == math.ceil(len(TEXT) / 100)
    assert max(r["kv_tokens"] for r in records) == 100


def _loglikelihoods(harness: SelkvLM) -> list[tuple[float, bool]]:
    context = TEXT[:-40]
    return harness.loglikelihood(
        [request("loglikelihood", context, TEXT[-40:]), request("loglikelihood", context, " and then it was not.")]
    )


def test_chunked_likelihood_reads_the_cache(tiny):
    """Chunked: a lossless spec scores like full and int2 does not; one pass cannot tell them apart."""
    full = _loglikelihoods(lm(tiny, "full"))
    lossless = _loglikelihoods(lm(tiny, LOSSLESS))
    int2 = lm(tiny, INT2)
    lossy = _loglikelihoods(int2)
    for (a, _), (b, _) in zip(full, lossless, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), **TOLERANCES["kernel_fp32"])
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(full, lossy, strict=True))
    one_pass = _loglikelihoods(lm(tiny, INT2, prefill_chunk=0))
    full_one_pass = _loglikelihoods(lm(tiny, "full", prefill_chunk=0))
    for (a, _), (b, _) in zip(full_one_pass, one_pass, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), **TOLERANCES["kernel_fp32"])
    kv = int2.get_model_info()["selkv"]["kv"]["t"]
    assert kv["requests"] == 2 and kv["compression"] > 2  # the bytes int2 held, against a 16-bit full cache


def test_results_record_spec_chunking_and_bytes(tiny):
    harness = lm(tiny, INT2, prefill_chunk=0)
    _loglikelihoods(harness)
    info = harness.get_model_info()["selkv"]
    assert info["cache"] == INT2 and info["prefill_chunk"] == 0
    assert info["chunking"].startswith("one pass")
    assert info["kv"]["t"]["kv_bytes"] < info["kv"]["t"]["kv_bytes_full16"]
    assert "chunks of 32 tokens" in lm(tiny, INT2).get_model_info()["selkv"]["chunking"]


PROMPT = TEXT[:150]


def _generate_until(harness: SelkvLM, prompts, **gen_kwargs) -> list[str]:
    kwargs = {"until": [], "max_gen_toks": 12, **gen_kwargs}
    return harness.generate_until([request("generate_until", p, dict(kwargs)) for p in prompts])


@pytest.mark.parametrize("spec", ["full", "quant:bits=2,sink=4,window=16,block=8", "drop:sink=4,window=16,block=8"])
def test_generate_until_equals_selkv_generate(tiny, spec):
    model, tok = tiny
    expected = generate(model, tok, {"input_ids": torch.tensor([tok.encode(PROMPT)])}, spec, max_new_tokens=12).text
    assert _generate_until(lm(tiny, spec, prefill_chunk=0), [PROMPT]) == [expected]


@pytest.mark.parametrize("spec", ["full", "quant:bits=8,sink=4,window=16,block=8", "drop:sink=4,window=16,block=8"])
def test_left_padded_batch_matches_prompts_alone(tiny, spec):
    prompts = [PROMPT, TEXT[40:100], TEXT[:90]]
    alone = [_generate_until(lm(tiny, spec), [p])[0] for p in prompts]
    assert _generate_until(lm(tiny, spec, batch_size=3), prompts) == alone


def test_generation_stops_at_a_stop_sequence(tiny):
    text = _generate_until(lm(tiny), [PROMPT], max_gen_toks=16)[0]
    stop = text[5:7]
    cut = _generate_until(lm(tiny), [PROMPT], until=[stop], max_gen_toks=16)[0]
    assert cut == text.split(stop)[0] and len(cut) < len(text)


def test_sampling(tiny):
    greedy = _generate_until(lm(tiny), [PROMPT])[0]
    assert _generate_until(lm(tiny), [PROMPT], do_sample=True, temperature=0.7, top_k=1)[0] == greedy
    torch.manual_seed(0)
    sampled = _generate_until(lm(tiny), [PROMPT], do_sample=True, temperature=5.0, top_p=0.99)[0]
    assert sampled != greedy and len(sampled) > 0


@pytest.mark.parametrize(
    "model_args,error,message",
    [
        ({"cache": "full", "chunk": 64}, SelKVError, "unknown selkv model_args 'chunk'"),
        ({"cache": "quant:bits=5"}, SpecError, "bits=5"),
        ({"prefill_chunk": -1}, SelKVError, "prefill_chunk must be >= 0"),
        ({"prefill_chunk": "x"}, SelKVError, "prefill_chunk='x' is not an integer"),
    ],
)
def test_bad_model_args_fail_clearly(tiny, model_args, error, message):
    model, tok = tiny
    with pytest.raises(error, match=message):
        SelkvLM(model=model, tokenizer=tok, **model_args)


@pytest.mark.parametrize(
    "model_args,message",
    [
        ({"cache": "full", "chunk": 64}, "unknown selkv model_args 'chunk'"),
        ({"cache": "quant:bits=5,sink=4"}, "bits=5 is not supported"),
        ({"pretrained": "./no-such-model"}, "no model folder at './no-such-model'"),
    ],
)
def test_cli_bad_model_args_end_in_one_line(capsys, model_args, message):
    """`selkv lm-eval` checks the selkv model args before the harness starts (JSON or key=value)."""
    from selkv.cli import main

    forms = [json.dumps(model_args)]
    if not any("," in str(v) for v in model_args.values()):  # key=value words cannot carry a spec's commas
        forms.append(",".join(f"{k}={v}" for k, v in model_args.items()))
    for form in forms:
        code = main(["lm-eval", "--model", "selkv", "--model_args", form, "--tasks", "selkv_needle_1k"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("selkv lm-eval: error:") and message in err and len(err.strip().splitlines()) == 1


def test_model_args_are_read_as_the_harness_reads_them():
    from selkv.eval.harness_model import model_args_from_argv

    assert model_args_from_argv(
        ["--model", "selkv", "--model_args", '{"cache": "quant:bits=4,sink=4", "prefill_chunk": 8}', "--tasks", "x"]
    ) == ("selkv", {"cache": "quant:bits=4,sink=4", "prefill_chunk": 8})
    assert model_args_from_argv(["-M", "selkv", "-a", "cache=full,prefill_chunk=0", "dtype=float32"]) == (
        "selkv",
        {"cache": "full", "prefill_chunk": 0, "dtype": "float32"},
    )


def test_missing_task_data_file_fails_before_the_model_loads(monkeypatch, capsys):
    from selkv import cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the input was checked"))
    code = cli.main(
        [
            "eval",
            "harness",
            "--cache",
            "full",
            "--tasks",
            "selkv_needle_1k",
            "--out",
            "/tmp/selkv-unused",
            "--metadata",
            '{"data_file": "no-such-essays.jsonl"}',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data file 'no-such-essays.jsonl' not found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@needs_embedded_model
@needs_shared_data  # the needle task's essays
def test_eval_harness_side_by_side_on_the_embedded_model(smollm, tmp_path):
    """`selkv eval harness`: each cache answers a selkv task through the harness; the table carries the bytes held."""
    from selkv.eval import harness
    from selkv.eval.report import table_lines

    model, tok = smollm
    settings = {**harness.DEFAULTS, "tasks": ["selkv_needle_1k"], "limit": 1}
    payload = run_task(
        harness, model, tok, "smollm2-135m", ["full", "quant:bits=2,sink=4,window=124"], str(tmp_path), settings
    )
    full, int2 = (r["metrics"] for r in payload["results"])
    assert full["by_task"]["selkv_needle_1k"] == 1.0 and full["n"] == 1
    assert int2["kv_bytes"] < full["kv_bytes"] / 4  # int2 held far less than the float32 full cache
    assert "chunks of 64 tokens" in json.loads((tmp_path / "examples.jsonl").read_text().splitlines()[0])["chunking"]
    assert any("`quant:bits=2,sink=4,window=124`" in line for line in table_lines(payload))


def test_cli_missing_task_data_file_ends_in_one_line(capsys):
    from selkv.cli import main

    code = main(
        [
            "lm-eval",
            "--model",
            "selkv",
            "--model_args",
            '{"cache": "full"}',
            "--tasks",
            "selkv_kv_1k,selkv_needle_1k",
            "--metadata",
            '{"data_file": "no-such-records.jsonl"}',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data file 'no-such-records.jsonl' not found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@needs_embedded_model
def test_ruler_niah_builds_its_data_without_a_network(monkeypatch):
    """RULER's niah_single_1 makes its samples locally; the punkt_tab download it tries on import is refused here."""
    pytest.importorskip("wonderwords", reason="RULER needs wonderwords (pip install wonderwords)")
    import nltk

    from selkv.models import resolve_model

    calls = []
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: calls.append(args) or False)
    from lm_eval.tasks.ruler import niah_utils

    samples = niah_utils.niah_single_1(tokenizer=resolve_model("smollm2-135m")[0], max_seq_lengths=[1024])["test"]
    assert len(samples) == 500 and samples[0]["outputs"][0] in samples[0]["input"]
    assert calls in ([], [("punkt_tab",)])  # at most the one refused attempt (none once the module is imported)


def test_report_tables_and_plots_a_harness_run(tmp_path):
    from selkv.eval import harness, report

    records = {
        "full": [
            {"key": "a", "metric": "acc", "value": 1.0, "n": 2, "kv_bytes": 4e6, "kv_bytes_full16": 2e6},
            {"key": "b", "metric": "acc", "value": 0.5, "n": 2, "kv_bytes": 8e6, "kv_bytes_full16": 4e6},
        ],
        INT2: [
            {"key": "a", "metric": "acc", "value": 1.0, "n": 2, "kv_bytes": 1e6, "kv_bytes_full16": 2e6},
            {"key": "b", "metric": "acc", "value": 0.0, "n": 2, "kv_bytes": 2e6, "kv_bytes_full16": 4e6},
        ],
    }
    results = [{"cache": c, "metrics": harness.aggregate(r)} for c, r in records.items()]
    results[1]["metrics"].update(harness.compare(results[1]["metrics"], results[0]["metrics"]))
    payload = {
        "task": "harness",
        "model": "m",
        "settings": {"tasks": ["a", "b"], "limit": 2, "chunk": 64},
        "complete": True,
        "results": results,
    }
    lines = report.table_lines(payload)
    assert "| cache | a | b | mean | vs full | n | KV MiB | held vs 16-bit full |" in lines
    assert any(line.startswith(f"| `{INT2}` | 1.00 | 0.00 | 0.500 | -0.250 | 4 |") for line in lines)
    assert report.plot_harness(payload, tmp_path / "h.png") and (tmp_path / "h.png").stat().st_size > 0

"""kvpress presses as peers (selkv.eval.peers): the compression axis, equal-memory ratios, the prefill-once
protocol, scoring, and `selkv report` reading both sides' results into one table. The presses themselves run in
kvpress's environment (`make test-kvpress` runs the test marked there); here a stand-in press exercises that side."""

from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch

import selkv
from selkv.cli import main as cli_main
from selkv.eval import peers
from selkv.eval.results import ResultsWriter

INT4, INT2 = peers.MATCHED


def test_kvpress_axis_is_one_minus_held_over_full16(tiny_llama):
    assert peers.kvpress_compression(25, 100) == 0.75
    assert peers.kvpress_compression(100, 100) == 0.0
    with pytest.raises(ValueError, match="positive"):
        peers.kvpress_compression(1, 0)
    full = peers.selkv_bytes("full", tiny_llama.config, 1000)
    assert full["held"] == full["full16"] == 1000 * 2 * 2 * 2 * 32 * 2  # tokens x layers x K,V x heads x dim x 2 B
    int4 = peers.selkv_bytes(INT4, tiny_llama.config, 1000)
    cache = selkv.make_cache(INT4, tiny_llama.config)  # a bfloat16 cache given the 1000 tokens in one pass
    for layer_idx in range(2):
        states = torch.randn(1, 2, 1000, 32, dtype=torch.bfloat16)
        cache.update(states, states.clone(), layer_idx)
    counted = selkv.kv_bytes(cache)
    assert int4 == {"held": counted["allocated"], "full16": counted["full16"]}
    # int4 holds its ~136 16-bit tokens and 4-bit codes with 16-bit scale and zero per 32 for the rest: ~0.42 of full
    assert 0.40 < int4["held"] / full["full16"] < 0.45
    ratios = [peers.matched_ratio(spec, tiny_llama.config, 1000) for spec in (INT4, INT2)]
    assert 0.5 < ratios[0] < ratios[1] < 0.85
    assert peers.matched_ratio(INT4, tiny_llama.config, 100) == 0.0  # sink + window hold every token


def test_press_rows_parse_and_refuse_clearly():
    rows = peers.default_rows("kvpress")
    assert rows[0] == peers.NO_PRESS and len(rows) == 1 + 2 * 4
    assert peers.parse_press_row(peers.press_row("snapkv", INT2)) == ("snapkv", INT2)
    with pytest.raises(ValueError, match="unknown press 'h2o'"):
        peers.parse_press_row("kvpress:h2o@" + INT4)
    with pytest.raises(ValueError, match="names no selkv spec"):
        peers.parse_press_row("kvpress:knorm")
    with pytest.raises(ValueError, match="--side"):
        peers.default_rows("vllm")


def test_kvpress_row_on_the_selkv_side_is_refused_in_one_line(capsys):
    assert peers.main(["--side", "selkv", "--out", "unused", "--rows", peers.press_row("knorm", INT4)]) == 2
    assert "run it with --side kvpress" in capsys.readouterr().err


def test_qa_f1_normalizes_like_squad():
    assert peers.qa_f1("The ReLU, SELU, tanh.", ["relu, selu, tanh"]) == 1.0
    assert peers.qa_f1("relu", ["relu, selu, tanh"]) == pytest.approx(0.5)
    assert peers.qa_f1("nothing here", ["yes", "relu"]) == 0.0
    assert peers.qa_f1("", ["yes"]) == 0.0


def test_answer_after_a_context_matches_one_long_generation(tiny_llama):
    """The protocol's question step (explicit positions after the context) gives model.generate's tokens."""
    context, question = torch.randint(3, 256, (60,)).tolist(), torch.randint(3, 256, (7,)).tolist()
    side = peers.SelkvSide(tiny_llama)
    state, _ = side.prefill("full", context)
    tokens = peers.answer(tiny_llama, state[0], question, len(context), 12, set())
    expected = tiny_llama.generate(
        torch.tensor([context + question]), max_new_tokens=12, do_sample=False, min_new_tokens=12
    )[0, 67:].tolist()
    assert tokens == expected


class _StandInPress:
    """A press with kvpress's interface: while active, the model's prefill keeps the last (1 - ratio) of its tokens."""

    def __init__(self, compression_ratio: float):
        self.compression_ratio = compression_ratio

    @contextlib.contextmanager
    def __call__(self, model):
        def trim(module, args, kwargs, output):
            cache = kwargs["past_key_values"]
            for layer in cache.layers:
                n = layer.keys.shape[-2]
                keep = n - int(n * self.compression_ratio)
                layer.keys, layer.values = layer.keys[:, :, n - keep :], layer.values[:, :, n - keep :]

        handle = model.model.register_forward_hook(trim, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _items():
    torch.manual_seed(3)
    ids = lambda n: torch.randint(3, 256, (n,)).tolist()  # noqa: E731
    return [
        {
            "task": "needle",
            "key": "n0",
            "context": ids(300),
            "questions": [{"key": "n0", "ids": ids(5), "new_tokens": 6, "answer": "x", "length": 300, "depth": 0.5}],
        },
        {
            "task": "qa",
            "key": "d0",
            "context": ids(260),
            "questions": [
                {"key": f"d0-q{i}", "ids": ids(4 + i), "new_tokens": 8, "answers": ["a b"]} for i in range(3)
            ],
        },
    ]


def _run_side(model, side, rows, out):
    tokenizer = types.SimpleNamespace(decode=lambda tokens, **_: " ".join(map(str, tokens)), eos_token_id=None)
    writer = ResultsWriter(out, peers.TASK, "tiny", dict(peers.DEFAULTS), rows, peers.aggregate)
    writer.extra["side"] = "selkv" if isinstance(side, peers.SelkvSide) else "kvpress"
    peers.run(model, tokenizer, rows, writer, side, _items())
    return writer.flush(complete=True)


def test_both_sides_at_equal_memory_and_one_report_table(tiny_llama, tmp_path, capsys):
    selkv_side = _run_side(tiny_llama, peers.SelkvSide(tiny_llama), ["full", INT4, INT2], tmp_path / "selkv")
    stand_in = types.SimpleNamespace(**{name: _StandInPress for name in peers.PRESSES.values()})
    press_rows = [peers.NO_PRESS, peers.press_row("snapkv", INT4), peers.press_row("knorm", INT2)]
    matched = peers.matched_bytes(str(tmp_path / "selkv"))  # the bytes selkv's side recorded, per context
    press_side = _run_side(
        tiny_llama, peers.KvpressSide(tiny_llama, matched, stand_in), press_rows, tmp_path / "kvpress"
    )
    records = {}
    for line in (tmp_path / "selkv" / "examples.jsonl").read_text().splitlines() + (
        tmp_path / "kvpress" / "examples.jsonl"
    ).read_text().splitlines():
        r = json.loads(line)
        records[(r["cache"], r["key"])] = r
    # The press holds what the selkv spec it matches holds, within one token per layer (the press keeps whole tokens).
    per_token = 2 * 2 * 2 * 32 * 2
    for spec, row in ((INT4, press_rows[1]), (INT2, press_rows[2])):
        for key in ("needle:n0", "qa:d0-q1"):
            assert abs(records[(row, key)]["kv_bytes16_held"] - records[(spec, key)]["kv_bytes16_held"]) <= per_token
            assert records[(row, key)]["compression_kvpress"] == pytest.approx(
                records[(spec, key)]["compression_kvpress"], abs=1 / 260
            )
    # No press is the full cache: the same tokens in both environments' code paths.
    for key in ("needle:n0", "qa:d0-q0", "qa:d0-q2"):
        assert records[(peers.NO_PRESS, key)]["tokens"] == records[("full", key)]["tokens"]
        assert records[("full", key)]["compression_kvpress"] == 0.0
    metrics = {r["cache"]: r["metrics"] for r in selkv_side["results"] + press_side["results"]}
    assert metrics[INT2]["compression_kvpress"] > metrics[INT4]["compression_kvpress"] > 0.1
    assert metrics[INT4]["qa_n"] == 3 and metrics[INT4]["needle_n"] == 1 and metrics[INT4]["rougeL"] is None

    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.count("### kvpress presses beside selkv") == 1  # both folders, one table
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | bytes matched to | compression (1 - held / 16-bit full)")
    assert table[2].startswith("| selkv `full` | itself | 0.00 |") and "kvpress SnapKV" in table[6]
    assert f"`{INT4}`" in table[6] and f"{metrics[press_rows[1]]['compression_kvpress']:.2f}" in table[6]
    capsys.readouterr()


def test_kvpress_side_refuses_other_inputs_or_a_missing_selkv_run(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the selkv side first"):
        peers.matched_bytes(str(tmp_path / "nothing"))
    context = list(range(3, 303))
    full16 = peers.full_bytes16(tiny_llama.config, 300)
    assert full16 == peers.selkv_bytes("full", tiny_llama.config, 300)["full16"]
    stand_in = types.SimpleNamespace(SnapKVPress=_StandInPress)
    matched = {(INT4, "needle:n0"): {"held": full16 // 2, "full16": full16, "digest": peers.context_digest(context)}}
    side = peers.KvpressSide(tiny_llama, matched, stand_in)
    assert side.ratio(INT4, context, "needle:n0") == 0.5
    with pytest.raises(ValueError, match="other token ids"):
        side.ratio(INT4, context[:-1] + [9], "needle:n0")
    with pytest.raises(KeyError, match="no 'quant:bits=2"):
        side.prefill(peers.press_row("snapkv", INT2), context, "needle:n0")


def test_kvpress_side_without_kvpress_says_where_it_runs(tiny_llama):
    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="make peers-kvpress"):
            peers.KvpressSide(tiny_llama)
    else:
        pytest.skip("kvpress is installed here")


def test_snapshot_restore_reaches_selkv_side_rows(tiny_llama):
    """Three questions against one prefilled context: each answer equals the answer of a fresh prefill."""
    side = peers.SelkvSide(tiny_llama)
    item = _items()[1]
    state, _ = side.prefill(INT2, item["context"])
    answers = []
    for q in item["questions"]:
        answers.append(peers.answer(tiny_llama, state[0], q["ids"], len(item["context"]), 8, set()))
        side.restore(state)
    fresh = [
        peers.answer(tiny_llama, side.prefill(INT2, item["context"])[0][0], q["ids"], len(item["context"]), 8, set())
        for q in item["questions"]
    ]
    assert answers == fresh and isinstance(state[0], selkv.SelectiveCache)


def test_kvpress_env_presses_keep_their_ratio_and_restore(tiny_llama):
    """In kvpress's environment (`make test-kvpress`; skipped elsewhere): each real press at a ratio holds
    1 - ratio of the full cache's bytes (the equal-memory matching), and the protocol's restore repeats answers."""
    kvpress = pytest.importorskip("kvpress")
    context = torch.randint(3, 256, (400,)).tolist()
    full16 = peers.full_bytes16(tiny_llama.config, len(context))
    digest = peers.context_digest(context)
    matched = {
        (spec, "k"): {"held": int(full16 * held), "full16": full16, "digest": digest}
        for spec, held in zip(peers.MATCHED, (0.42, 0.3), strict=True)
    }
    side = peers.KvpressSide(tiny_llama, matched, kvpress)
    per_layer_token = full16 // len(context) // 2
    for press in peers.PRESSES:
        for spec in peers.MATCHED:
            state, memory = side.prefill(peers.press_row(press, spec), context, "k")
            assert abs(memory["held"] - matched[(spec, "k")]["held"]) <= 2 * per_layer_token, (press, spec)
            tokens = peers.answer(tiny_llama, state[0], [5, 6, 7], len(context), 4, set())
            side.restore(state)
            assert peers.answer(tiny_llama, state[0], [5, 6, 7], len(context), 4, set()) == tokens

"""``selkv calibrate``: the screen ranks layers by the measured perplexities, the budget chooses, the mix is
evaluated; a rerun resumes; bad input is one line and exit code 2.

The ranking and budget cases replace the perplexity function with known numbers (each run's spec tells which);
one end-to-end case runs the tiny random Llama for real. Sizes are counted at 256 tokens to stay fast.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from support.models import make_tiny_llama, tiny_llama_config

from selkv import cli
from selkv.errors import SelKVError
from selkv.eval import calibrate, perplexity
from selkv.eval.results import SettingsMismatch
from selkv.sizing import cache_size
from selkv.specs import parse_spec
from selkv.specs import quant as quant_spec

BASE = "quant:bits=2,sink=4,window=16,block=8,vsym=0"  # value zeros stored: 3-bit keys in the last 3/4 only
SIZE = 256  # --size-tokens
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8


class ByteTokenizer:
    """One token per UTF-8 byte (the tiny Llama has 256 ids)."""

    eos_token_id = 2
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def stand_in(config):
    """What calibrate reads of a model when the perplexity function is replaced: its config, dtype and device."""
    return SimpleNamespace(config=config, dtype=torch.float32, device=torch.device("cpu"))


def fake_scores(monkeypatch, layer_ppl: dict[int, float], full=10.0, base=12.0, mix=11.0):
    """Replace the perplexity function: ``full``, the base, each single-layer spec its ``layer_ppl``, any mix
    ``mix``. Returns the list of specs scored, in order."""
    scored = []

    def score(model, ids, spec, chunk):
        parsed = parse_spec(spec)
        scored.append(spec)
        if parsed.kind == "full":
            ppl = full
        elif not parsed.layer_bits:
            ppl = base
        elif len(parsed.layer_bits) == 1:
            ppl = layer_ppl[parsed.layer_bits[0][0]]
        else:
            ppl = mix
        tokens = len(ids) - 1
        return math.log(ppl) * tokens, tokens, {}

    monkeypatch.setattr(perplexity, "score", score)
    return scored


def run(model, text_file, out, tokenizer=None, **budget):
    settings = {"data": text_file, "max_tokens": 96, "chunk": 16, "size_tokens": SIZE, "model_name": "tiny"}
    return calibrate.calibrate(model, tokenizer or ByteTokenizer(), BASE, "4/2", out, **settings, **budget)


# Six layers, each upgrade measured: the gains are 0.5, 1.5, -0.2, 1.0, 0.1, 0.0 (base 12.0).
LAYER_PPL = {0: 11.5, 1: 10.5, 2: 12.2, 3: 11.0, 4: 11.9, 5: 12.0}
RANKING = [1, 3, 0, 4, 5, 2]


def test_ranking_and_layer_count_follow_the_measured_numbers(monkeypatch, text_file, tmp_path):
    scored = fake_scores(monkeypatch, LAYER_PPL)
    result = run(stand_in(tiny_llama_config(layers=6)), text_file, tmp_path, layers=3)
    assert result["ranking"] == RANKING
    assert result["chosen"] == [1, 3, 0]
    assert result["spec"] == f"{BASE},layer_bits=0-1:4/2+3:4/2"
    rows = {row["layer"]: row for row in result["layers"]}
    assert [rows[layer]["rank"] for layer in range(6)] == [3, 1, 6, 2, 4, 5]
    assert rows[1]["gain"] == pytest.approx(1.5) and rows[2]["gain"] == pytest.approx(-0.2)
    assert rows[1]["ppl_vs_full"] == pytest.approx(0.05) and rows[1]["ppl_vs_base"] == pytest.approx(10.5 / 12 - 1)
    assert [layer for layer in range(6) if rows[layer]["chosen"]] == [0, 1, 3]
    assert result["mix"]["ppl"] == pytest.approx(11.0) and result["mix"]["layers"] == [0, 1, 3]
    assert result["base"]["ppl_vs_full"] == pytest.approx(0.2)
    # full, the base, six layers, then the mix: each once
    assert scored == ["full", BASE, *(f"{BASE},layer_bits={i}:4/2" for i in range(6)), result["spec"]]
    assert result["complete"] and json.loads((tmp_path / "calibrate.json").read_text()) == result


def test_min_ratio_takes_the_first_ranked_layers_that_fit(monkeypatch, text_file, tmp_path):
    config = tiny_llama_config(layers=6)
    fake_scores(monkeypatch, LAYER_PPL)

    def ratio(layers):  # selkv size's count, independent of calibrate's bookkeeping
        return cache_size(calibrate.with_layers(BASE, layers, (4, 2)), config, SIZE, chunk=16)["compression"]

    two, three = ratio([1, 3]), ratio([1, 3, 0])
    assert ratio([]) > ratio([1]) > two > three  # each upgraded layer holds more
    result = run(stand_in(config), text_file, tmp_path / "a", min_ratio=(two + three) / 2)
    assert result["chosen"] == [1, 3]
    assert result["mix"]["compression"] == pytest.approx(two) and result["budget"]["min_ratio"] == (two + three) / 2
    assert result["mix"]["held_bytes"] == cache_size(result["spec"], config, SIZE, chunk=16)["allocated"]
    # Exactly at a mix's ratio it still fits.
    assert run(stand_in(config), text_file, tmp_path / "b", min_ratio=three)["chosen"] == [1, 3, 0]
    # Room for every layer: only those whose upgrade lowered the perplexity (layer 5's gain is 0, layer 2's < 0).
    assert run(stand_in(config), text_file, tmp_path / "c", min_ratio=1.0)["chosen"] == [1, 3, 0, 4]


def test_min_ratio_without_a_helpful_layer_keeps_the_base(monkeypatch, text_file, tmp_path):
    scored = fake_scores(monkeypatch, {0: 12.5, 1: 12.0})
    result = run(stand_in(tiny_llama_config(layers=2)), text_file, tmp_path, min_ratio=1.0)
    assert result["chosen"] == [] and result["spec"] == BASE
    assert result["mix"]["ppl"] == pytest.approx(12.0) and len(scored) == 4  # the base is not run twice


def test_sliding_window_layers_are_skipped(monkeypatch, text_file, tmp_path):
    config = tiny_llama_config(layers=4)
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = 8
    scored = fake_scores(monkeypatch, {1: 11.0, 3: 11.5})
    result = run(stand_in(config), text_file, tmp_path, layers=2)
    assert result["screened_layers"] == [1, 3] and result["chosen"] == [1, 3]
    assert [entry["layer"] for entry in result["skipped_layers"]] == [0, 2]
    assert not any("layer_bits=0:" in spec or "layer_bits=2:" in spec for spec in scored)
    assert "| 0 | | | | | sliding_attention, kept 16-bit |" in calibrate.table_lines(result)
    with pytest.raises(SelKVError, match=r"--layers 3: this model has 2 quantized layers \(2 sliding-window"):
        run(stand_in(config), text_file, tmp_path / "b", layers=3)


def test_an_interrupted_screen_resumes_and_a_new_budget_reuses_it(monkeypatch, text_file, tmp_path):
    model = stand_in(tiny_llama_config(layers=6))
    scored = fake_scores(monkeypatch, LAYER_PPL)
    reference = run(model, text_file, tmp_path / "ref", layers=2)
    scored.clear()
    fake = perplexity.score

    def interrupted(*args):
        if len(scored) == 4:
            raise KeyboardInterrupt
        return fake(*args)

    monkeypatch.setattr(perplexity, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(model, text_file, tmp_path / "run", layers=2)
    partial = json.loads((tmp_path / "run" / "calibrate.json").read_text())
    assert not partial["complete"] and len(partial["runs"]) == 4 and "chosen" not in partial

    scored.clear()
    monkeypatch.setattr(perplexity, "score", fake)
    result = run(model, text_file, tmp_path / "run", layers=2)
    assert scored == [f"{BASE},layer_bits={i}:4/2" for i in range(2, 6)] + [result["spec"]]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in result["layers"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in reference["layers"]]
    assert result["chosen"] == reference["chosen"] == [1, 3]

    scored.clear()  # a finished folder: nothing to run
    assert run(model, text_file, tmp_path / "run", layers=2)["chosen"] == [1, 3] and scored == []
    assert run(model, text_file, tmp_path / "run", layers=3)["chosen"] == [1, 3, 0]  # a new budget: the mix only
    assert scored == [f"{BASE},layer_bits=0-1:4/2+3:4/2"]
    with pytest.raises(SettingsMismatch, match="different settings"):
        calibrate.calibrate(model, ByteTokenizer(), BASE, "4/3", tmp_path / "run", data=text_file, max_tokens=96,
                            chunk=16, layers=2, size_tokens=SIZE, model_name="tiny")  # fmt: skip
    # the same base text under other defaults (here: which layers the 2-bit rule widens) is another calibration
    monkeypatch.setitem(quant_spec.STORED_ZERO_LATE_SHARE, 2, Fraction(1, 2))
    with pytest.raises(SettingsMismatch, match="different settings"):
        run(model, text_file, tmp_path / "run", layers=2)


def test_end_to_end_on_the_tiny_model(text_file, tmp_path, capsys):
    model = make_tiny_llama(layers=3)
    result = run(model, text_file, tmp_path, layers=2)
    saved = json.loads((tmp_path / "calibrate.json").read_text())
    assert saved == result and saved["complete"]
    assert set(saved["settings"]) == {"data", "max_tokens", "chunk", "cache", "resolved", "upgrade", "dtype", "device"}
    resolved = saved["settings"]["resolved"]  # the base with this model's defaults, and the layers its rule widens
    assert ",block=8,late_kbits=3," in resolved and resolved.endswith(" late_layers=1,2")
    assert {"ranking", "chosen", "spec", "mix", "full", "base", "budget", "environment"} <= set(saved)
    assert (tmp_path / "calibrate.png").stat().st_size > 0
    ids = ByteTokenizer().encode(TEXT)[:96]
    full, base = perplexity.score(model, ids, "full", 16)[0], perplexity.score(model, ids, BASE, 16)[0]
    assert saved["full"]["nll_sum"] == full and saved["base"]["nll_sum"] == base != full  # the base is lossy
    # The ranking follows the measured gains, and the final spec reproduces the reported mix.
    gains = {row["layer"]: row["gain"] for row in saved["layers"]}
    assert saved["ranking"] == sorted(gains, key=lambda layer: (-gains[layer], layer))
    assert saved["chosen"] == saved["ranking"][:2]
    spec = parse_spec(saved["spec"])
    assert [layer for layer, _, _ in spec.layer_bits] == sorted(saved["chosen"])
    assert {(k, v) for _, k, v in spec.layer_bits} == {(4, 2)}
    nll_sum, tokens, _ = perplexity.score(model, ids, saved["spec"], 16)
    assert nll_sum == saved["mix"]["nll_sum"] and math.exp(nll_sum / tokens) == saved["mix"]["ppl"]
    lines = calibrate.table_lines(saved)
    assert lines[-1].startswith("mix: ppl ") and sum(line.startswith("| **") for line in lines) == 2


@pytest.fixture
def model_folder(tmp_path):
    """A folder holding the tiny Llama's config (all calibrate reads before the model loads)."""
    folder = tmp_path / "tiny"
    tiny_llama_config(layers=3).save_pretrained(folder)
    return str(folder)


def test_cli_prints_the_table_and_the_spec_last(monkeypatch, capsys, text_file, tmp_path, model_folder):
    monkeypatch.setattr(cli, "_load", lambda args: (make_tiny_llama(layers=3), ByteTokenizer()))
    monkeypatch.setenv("SELKV_NO_PROGRESS", "1")
    out = tmp_path / "out"

    def argv(max_tokens):
        words = ["calibrate", "--model", model_folder, "--cache", BASE, "--upgrade", "4/2", "--layers", "1"]
        words += ["--data", text_file, "--max-tokens", max_tokens, "--chunk", "16", "--size-tokens", str(SIZE)]
        return [*words, "--out", str(out)]

    assert cli.main(argv("96")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((out / "calibrate.json").read_text())
    assert lines[-1] == saved["spec"] and lines[-2] == "spec:"
    assert "| layer | ppl | vs full | gain | rank | held |" in lines
    assert saved["command"] == (
        f"selkv calibrate --model {model_folder} --cache {BASE} --upgrade 4/2 --layers 1 --size-tokens {SIZE} "
        f"--data {text_file} --max-tokens 96 --chunk 16 --out {out}"
    )
    # Resuming with other settings is one line, exit 2.
    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    assert cli.main(argv("64")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selkv calibrate: error: ") and "different settings" in err and len(err.splitlines()) == 1


BAD_INPUT = [
    (["--cache", "full"], "'full' cache; calibrate upgrades layers of a quant: spec"),
    (["--cache", "drop:sink=4,window=16"], "calibrate upgrades layers of a quant: spec"),
    (["--cache", "quant:bits=5"], "bits=5 is not supported"),
    (["--cache", f"{BASE},layer_bits=1:4/2"], "already sets layer_bits"),
    (["--upgrade", "2/2"], "--upgrade 2/2 is not wider than the base's 2/2"),
    (["--upgrade", "8/1"], "VBITS=1 is not supported"),
    (["--upgrade", "4"], "--upgrade '4' is malformed; give KBITS/VBITS"),
    (["--cache", "quant:bits=4,sink=4,window=16", "--upgrade", "8/2"], "is not wider than the base's 4/4"),
    (["--data", "no-such-set"], "no text file or named set 'no-such-set'"),
    (["--max-tokens", "1"], "argument --max-tokens: must be >= 2"),
    (["--min-ratio", "50"], "--min-ratio 50: the base itself holds only"),
    (["--min-ratio", "0"], "argument --min-ratio: must be > 0, got 0"),
    (["--layers", "4"], "--layers 4: this model has 3 quantized layers; give 1 to 3"),
    (["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["--layers", "1", "--min-ratio", "2"], "not allowed with argument"),
    # bits=2's later layers (the last 3/4) hold 3-bit keys (late_kbits): an upgrade must not narrow them
    (["--upgrade", "2/4"], "--upgrade 2/4 has narrower keys than the base's later layers (late_kbits=3)"),
]


def test_later_layers_already_at_the_upgrade_are_not_screened():
    config = tiny_llama_config(layers=3)
    plan = calibrate.make_plan(BASE, "3/2", config, layers=1, size_tokens=SIZE, size_chunk=16)
    assert plan.layers == (0,)  # the last 3/4 (layers 1 and 2 of 3) hold 3-bit keys already (late_kbits)
    assert calibrate.make_plan(BASE, "4/2", config, layers=1, size_tokens=SIZE, size_chunk=16).layers == (0, 1, 2)
    off = calibrate.make_plan(f"{BASE},late_kbits=2", "3/2", config, layers=1, size_tokens=SIZE, size_chunk=16)
    assert off.layers == (0, 1, 2)
    # the 3-bit layout with value zeros stored: the last 2/5 (layers 3 and 4 of 5) hold 4-bit keys already; the
    # 3-bit default (symmetric values): the last 2/3 (layers 2-4)
    three = BASE.replace("bits=2", "bits=3")
    config = tiny_llama_config(layers=5)
    for upgrade, layers in (("4/3", (0, 1, 2)), ("4/4", (0, 1, 2, 3, 4))):
        assert calibrate.make_plan(three, upgrade, config, layers=1, size_tokens=SIZE, size_chunk=16).layers == layers
    default = three.replace(",vsym=0", "")
    assert calibrate.make_plan(default, "4/3", config, layers=1, size_tokens=SIZE, size_chunk=16).layers == (0, 1)


def test_a_base_whose_rule_covers_every_layer_has_nothing_to_screen():
    """The 2-bit default stores 3-bit keys in every layer: upgrading to 3/2 says so in one line (not "no
    full-attention layers")."""
    config = tiny_llama_config(layers=3)
    with pytest.raises(SelKVError, match=r"every full-attention layer already stores 3/2 keys/values \(late_kbits=3\)"):
        calibrate.make_plan("quant:bits=2,sink=4,window=16,block=8", "3/2", config, layers=1, size_tokens=SIZE,
                            size_chunk=16)  # fmt: skip


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_is_one_line_before_the_model_loads(monkeypatch, capsys, text_file, tmp_path, model_folder, argv,
                                                      message):  # fmt: skip
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the input was checked"))
    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    out = tmp_path / "out"
    defaults = {"--cache": BASE, "--upgrade": "4/2", "--data": text_file, "--size-tokens": str(SIZE)}
    if not {"--layers", "--min-ratio"} & set(argv):
        defaults["--layers"] = "1"
    given = [word for flag, value in defaults.items() if flag not in argv for word in (flag, value)]
    code = cli.main(["calibrate", "--model", model_folder, *given, *argv, "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("selkv calibrate: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_a_ratio_that_leaves_room_for_no_layer_is_refused(capsys, monkeypatch, model_folder, text_file, tmp_path):
    config = tiny_llama_config(layers=3)
    base = calibrate.held(BASE, config, SIZE, 16)["compression"]
    # the cheapest one-layer upgrade: layer 1 or 2 (the last 3/4, their keys 3-bit under bits=2's late_kbits rule)
    one = max(calibrate.held(f"{BASE},layer_bits={i}:4/2", config, SIZE, 16)["compression"] for i in range(3))
    assert one == calibrate.held(f"{BASE},layer_bits=2:4/2", config, SIZE, 16)["compression"]
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the input was checked"))
    argv = ["calibrate", "--model", model_folder, "--cache", BASE, "--upgrade", "4/2", "--data", text_file]
    argv += ["--size-tokens", str(SIZE), "--chunk", "16", "--min-ratio", f"{(base + one) / 2}", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "leaves room for no layer" in err and f"takes it to {one:.3f}x at most" in err and len(err.splitlines()) == 1


def test_help_explains_and_shows_an_example(capsys):
    assert cli.main(["calibrate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: selkv calibrate" in out and "--min-ratio R" in out and "calibrate.json" in out
    assert "example" in out and "--upgrade 4/3" in out

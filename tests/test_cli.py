"""The ``selkv`` CLI: commands, help, and bad input.

Bad input ends with one line on stderr and exit code 2, never a traceback; ``load_model`` raises
:class:`selkv.errors.SelKVError` subclasses with the same messages; genuine bugs keep their tracebacks.

The models here are tiny random ones saved to a temporary folder with a word-level tokenizer, so
that each case runs in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.markers import needs_embedded_model

import selkv
from selkv import cli
from selkv.cli import add_eval_commands
from selkv.cli import main as cli_main
from selkv.errors import DeviceError, ModelNotFoundError, SelKVError, UnsupportedModelError
from selkv.eval.suite import DEFAULT_CACHES
from selkv.upstream import falcon_uses_attention_interface

WORDS = ["[UNK]", "[EOS]", "hello", "world", "the", "cache", "is", "small"]


def save_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer with no special tokens added: an empty prompt gives zero tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)


def save_model(folder: Path, config, tokenizer: bool = True) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Local model folders: a tiny Llama, a tiny ALiBi Falcon (attention outside AttentionInterface before
    transformers 5.25, its position bias inside the mask after), a Llama
    without tokenizer files, and a folder holding only the config of a model that is not a causal LM."""
    from transformers import FalconConfig, LlamaConfig, T5Config

    root = tmp_path_factory.mktemp("models")
    llama = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    falcon = FalconConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, eos_token_id=1, alibi=True
    )
    t5 = root / "t5"
    t5.mkdir()
    T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    return {
        "llama": save_model(root / "llama", llama),
        "falcon": save_model(root / "falcon", falcon),
        "falcon-rope": save_model(root / "falcon-rope", FalconConfig(**{**falcon.to_dict(), "alibi": False})),
        "no_tokenizer": save_model(root / "no_tokenizer", llama, tokenizer=False),
        "t5": str(t5),
    }


@pytest.fixture
def offline(monkeypatch):
    """Hub ids resolve against the local cache only: no network wait, the same error as a machine offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("SELKV_DEBUG", raising=False)


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``selkv argv`` in-process; assert exit code 2 and one stderr line naming every needle."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in err.splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    prog = " ".join(["selkv", *argv[:2]]) if argv[0] == "eval" else f"selkv {argv[0]}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_unknown_hub_model(capsys, offline):
    line = one_line_error(
        capsys, ["generate", "--model", "no/such-model", "--prompt", "hi", "--device", "cpu"], "'no/such-model'"
    )
    assert "Hugging Face model id" in line  # what to pass instead


@pytest.mark.parametrize("command", ["size", "generate"])
def test_missing_model_folder(capsys, offline, tmp_path, command):
    nope = str(tmp_path / "nope")
    extra = ["--prompt", "hi", "--device", "cpu"] if command == "generate" else []
    one_line_error(capsys, [command, "--model", nope, *extra], "no model folder", nope)


def test_folder_without_config(capsys, offline, tmp_path):
    one_line_error(capsys, ["size", "--model", str(tmp_path)], "has no config.json")


def test_model_without_tokenizer(capsys, offline, models):
    one_line_error(
        capsys,
        ["generate", "--model", models["no_tokenizer"], "--prompt", "hello", "--device", "cpu"],
        "cannot load a tokenizer",
        "tokenizer.json",
    )


def test_model_that_is_not_a_causal_lm(capsys, offline, models):
    one_line_error(
        capsys,
        ["generate", "--model", models["t5"], "--prompt", "hello", "--device", "cpu"],
        "'t5'",
        "causal language model",
    )


def test_load_model_api_raises_selkv_errors(offline, tmp_path, models):
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        selkv.load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelNotFoundError, match="no/such-model"):
        selkv.load_model("no/such-model", device="cpu")
    with pytest.raises(UnsupportedModelError, match="causal language model"):
        selkv.load_model(models["t5"], device="cpu")


def test_selkv_attention_on_unsupported_model(capsys, offline, models):
    one_line_error(
        capsys,
        ["generate", "--model", models["falcon"], "--attn", "selkv", "--prompt", "hello", "--device", "cpu"],
        "FalconForCausalLM",
        "AttentionInterface",
        "'sdpa'",
    )


def test_load_model_selkv_attention_error_is_not_keyerror(offline, models):
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM.*Use 'sdpa' or 'eager'") as info:
        selkv.load_model(models["falcon"], device="cpu", attn_implementation="selkv")
    assert isinstance(info.value, ValueError) and not isinstance(info.value, KeyError)
    model, _ = selkv.load_model(models["falcon"], device="cpu", attn_implementation="sdpa")  # still loads
    assert model.config.model_type == "falcon"


def test_selkv_attention_on_supported_model_loads(offline, models):
    model, tokenizer = selkv.load_model(models["llama"], device="cpu", attn_implementation="selkv")
    assert model.config._attn_implementation == "selkv" and tokenizer.padding_side == "left"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_cpu_only_torch(capsys, offline, models):
    one_line_error(
        capsys,
        ["generate", "--model", models["llama"], "--device", "cuda", "--prompt", "hello"],
        "'cuda' is not available",
        "'cpu'",
    )
    with pytest.raises(DeviceError):
        selkv.load_model(models["llama"], device="cuda")


@pytest.mark.parametrize("device, needle", [("gpu", "unknown device 'gpu'"), ("cuda:99", "'cuda:99'")])
def test_bad_device(capsys, offline, models, device, needle):
    one_line_error(capsys, ["generate", "--model", models["llama"], "--device", device, "--prompt", "hello"], needle)


def test_empty_prompt_without_chat_template(capsys, offline, models):
    one_line_error(
        capsys,
        ["generate", "--model", models["llama"], "--device", "cpu", "--no-chat", "--prompt", ""],
        "gives no tokens",
        "--prompt",
    )


def test_prompt_file_is_a_folder(capsys, offline, tmp_path):
    one_line_error(capsys, ["generate", "--prompt-file", str(tmp_path)], "--prompt-file", str(tmp_path))


def test_prompt_that_works(capsys, offline, models):
    assert (
        cli.main(
            [
                "generate",
                "--model",
                models["llama"],
                "--device",
                "cpu",
                "--no-chat",
                "--prompt",
                "hello world",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "=== full" in capsys.readouterr().out


def test_out_is_a_file(capsys, offline, tmp_path, models):
    text, out = tmp_path / "text.txt", tmp_path / "taken"
    text.write_text("hello world " * 50)
    out.write_text("not a folder")
    one_line_error(
        capsys,
        [
            "eval",
            "perplexity",
            "--model",
            models["llama"],
            "--device",
            "cpu",
            "--cache",
            "full",
            "--data",
            str(text),
            "--max-tokens",
            "16",
            "--out",
            str(out),
        ],
        "--out",
        "is a file",
    )


def test_report_out_is_a_file(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"task": "memory", "settings": {}, "results": []}))
    (tmp_path / "taken").write_text("")
    one_line_error(capsys, ["report", str(run), "--out", str(tmp_path / "taken")], "is a file")


@pytest.mark.parametrize(
    "payload, needle",
    [
        ([], "top level is a JSON list"),
        ({"results": []}, "no 'task'"),
        ({"task": "perplexity"}, "no 'results' list"),
        ({"task": "perplexity", "settings": [], "results": []}, "'settings' is not an object"),
        ({"task": "needle", "results": [{"metrics": {}}]}, "results[0] has no 'cache'"),
        ({"task": "speed", "results": ["full"]}, "results[0] has no 'cache'"),
        ({"task": "memory", "results": [{"cache": "full", "metrics": [1, 2]}]}, "results[0]['metrics']"),
    ],
)
def test_report_of_wrong_structure(capsys, tmp_path, payload, needle):
    (tmp_path / "results.json").write_text(json.dumps(payload))
    one_line_error(capsys, ["report", str(tmp_path)], "not a selkv results file", needle, "selkv eval")


def test_report_shows_odd_metric_values(capsys, tmp_path):
    payload = {"task": "perplexity", "results": [{"cache": "full", "metrics": {"ppl": "high", "kv_bytes": "?"}}]}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "| `full` | high |" in capsys.readouterr().out


def test_interrupt_is_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_size", interrupted)
    try:
        code = cli.main(["size"])
    except KeyboardInterrupt:  # re-raised here it would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped main() with a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip() == "selkv size: interrupted"


def test_selkv_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("SELKV_DEBUG", "1")
    with pytest.raises(ModelNotFoundError):
        cli.main(["size", "--model", str(tmp_path / "nope")])


def test_bugs_keep_their_traceback(monkeypatch):
    """A ValueError from outside selkv (here: json) means selkv passed something wrong: not a user error."""
    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_size", lambda args: json.loads("{"))
    with pytest.raises(json.JSONDecodeError):
        cli.main(["size"])
    monkeypatch.setattr(cli, "cmd_size", lambda args: {}["key"])
    with pytest.raises(KeyError):
        cli.main(["size"])


def test_internal_value_errors_are_bugs_even_from_selkv_code(monkeypatch):
    """Only SelKVError is an input error: a plain ValueError from selkv's own internals keeps its traceback."""
    from selkv import quant

    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_size", lambda args: quant.pack(torch.zeros(1, 3, dtype=torch.uint8), 4))
    with pytest.raises(ValueError, match="multiple of 2"):
        cli.main(["size"])


def test_user_error_classes_are_value_errors():
    from selkv.errors import CapacityError, UnsupportedInputError
    from selkv.eval.data import DataError
    from selkv.eval.results import SettingsMismatch

    assert selkv.SelKVError is SelKVError and issubclass(SelKVError, ValueError)  # `except ValueError` still works
    for cls in (
        ModelNotFoundError,
        UnsupportedModelError,
        DeviceError,
        selkv.SpecError,
        CapacityError,
        UnsupportedInputError,
        DataError,
        SettingsMismatch,
    ):
        assert issubclass(cls, SelKVError)
        assert cli.is_user_error(cls("x"))
    assert issubclass(UnsupportedInputError, NotImplementedError)  # as transformers' caches raise for what they lack


def test_entry_point_prints_one_line(tmp_path):
    """``python -m selkv.cli``: the same one line and exit code 2 as in-process, with nothing else on stderr."""
    nope = str(tmp_path / "nope")
    env = {**os.environ, "PYTHONPATH": str(Path(selkv.__file__).parents[1])}
    env.pop("SELKV_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "selkv.cli", "size", "--model", nope],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"selkv size: error: no model folder at {nope!r}; {selkv.models.MODEL_HELP}"
    ]


def test_cli_registers_eval_and_report():
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "perplexity", "--out", "x", "--cache", "full", "--chunk", "1"])
    assert args.task == "perplexity" and args.chunk == 1 and args.handler.__name__ == "cmd_eval"
    args = parser.parse_args(["eval", "all", "--out", "x", "--quick"])
    assert args.quick and args.cache is None
    args = parser.parse_args(["report", "a", "b"])
    assert args.dirs == ["a", "b"]
    assert len(DEFAULT_CACHES) == 7 and DEFAULT_CACHES[0] == "full"


def test_cli_rejects_bad_spec_before_loading(tmp_path, capsys):
    from selkv.cli import main

    assert main(["eval", "perplexity", "--out", str(tmp_path), "--cache", "quant:bits=5"]) == 2
    assert "bits=5" in capsys.readouterr().err


@pytest.fixture
def parse_counts(monkeypatch):
    """How many times each spec string is parsed (every kind's ``parse`` is ``CacheSpec.parse``)."""
    from collections import Counter

    from selkv.specs.base import CacheSpec

    counts: Counter[str] = Counter()
    parse = CacheSpec.parse.__func__

    def counted(cls, spec):
        counts[spec] += 1
        return parse(cls, spec)

    monkeypatch.setattr(CacheSpec, "parse", classmethod(counted))
    return counts


# Written with spaces: results and tables are named by the text as written, not by str(spec).
PARSED_ONCE = ["full", "quant:bits=8, sink=4, window=8", "drop:sink=4,window=8", "full"]


def test_size_parses_each_spec_once(capsys, offline, models, parse_counts):
    argv = ["size", "--model", models["llama"], "--tokens", "32", "--chunk", "8"]
    assert cli.main([*argv, *(arg for spec in PARSED_ONCE for arg in ("--cache", spec))]) == 0
    assert parse_counts == dict.fromkeys(PARSED_ONCE, 1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == PARSED_ONCE  # a repeated spec is a repeated row, as before


@pytest.mark.parametrize("command", ["perplexity", "all"])
def test_eval_parses_each_spec_once(capsys, monkeypatch, offline, models, parse_counts, tmp_path, command):
    text, out = tmp_path / "text.txt", tmp_path / "out"
    text.write_text("hello world the cache is small " * 20)
    perplexity = {"data": str(text), "max_tokens": 24, "chunk": 8, "segments": 1}
    memory = {"data": str(text), "prompt_tokens": 12, "new_tokens": 4, "every": 2, "chunk": 8}
    monkeypatch.setattr(cli, "SUITE", (("ppl", "perplexity", perplexity), ("memory", "memory", memory)))
    monkeypatch.setenv("SELKV_NO_PROGRESS", "1")
    # `eval all` ends with the report, which reads the specs back from the results files: counted up to there.
    before_report, real_report = {}, cli.report.run
    monkeypatch.setattr(cli.report, "run", lambda *a, **k: before_report.update(parse_counts) or real_report(*a, **k))
    argv = ["eval", command, "--model", models["llama"], "--device", "cpu", "--out", str(out)]
    if command == "perplexity":
        argv += ["--data", str(text), "--max-tokens", "24", "--chunk", "8"]
    assert cli.main([*argv, *(arg for spec in PARSED_ONCE for arg in ("--cache", spec))]) == 0
    assert (before_report if command == "all" else parse_counts) == dict.fromkeys(PARSED_ONCE, 1)
    for results in out.rglob("results.json"):
        payload = json.loads(results.read_text())
        assert [r["cache"] for r in payload["results"]] == list(dict.fromkeys(PARSED_ONCE))


@pytest.mark.slow
@needs_embedded_model
def test_cli_generate_prints_text_speed_and_memory(capsys):
    code = cli_main(
        [
            "generate",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-new-tokens",
            "6",
            "--prompt",
            "Name three colours.",
            "--cache",
            "full",
            "--cache",
            "quant:bits=8,sink=4,window=124",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "=== full" in out and "=== quant:bits=8,sink=4,window=124" in out
    assert out.count("tok/s") == 2 and "16-bit full cache" in out


def test_cli_reports_bad_specs_without_a_traceback(capsys):
    assert cli_main(["generate", "--cache", "quant:bits=5", "--prompt", "x"]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["generate"], ["demo"]])
def test_help_describes_every_command(command):
    out = subprocess.run(
        [sys.executable, "-m", "selkv.cli", *command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: selkv" in out
    if command == ["generate"]:
        assert "--cache" in out and "quant:bits=2|3|4|8" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--cache", "drop:sink=4,window=16", "--static"], "--static takes 'full' and 'quant'"),
    ],
)
def test_cli_static_refuses_what_it_cannot_do(capsys, argv, message):
    from selkv.cli import main

    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "task,flag,value,message",
    [
        ("perplexity", "--data", "no-such-set", "no text file or named set 'no-such-set'"),
        ("perplexity", "--max-tokens", "1", "argument --max-tokens: must be >= 2, got 1"),
        # Counts: a one-pass perplexity never reads the cache; negative or zero counts measure nothing.
        ("perplexity", "--chunk", "0", "never reads the compressed cache"),
        ("perplexity", "--chunk", "-3", "argument --chunk: must be >= 1"),
        ("perplexity", "--segments", "0", "argument --segments: must be >= 1"),
        ("memory", "--prompt-tokens", "-5", "argument --prompt-tokens: must be >= 1, got -5"),
        ("memory", "--prompt-tokens", "0", "argument --prompt-tokens: must be >= 1, got 0"),
        ("memory", "--every", "0", "argument --every: must be >= 1"),
        ("summarization", "--limit", "-1", "argument --limit: must be >= 1, got -1"),
        ("summarization", "--max-doc-tokens", "-1", "argument --max-doc-tokens: must be >= 0"),
        ("needle", "--kv-pairs", "-1", "argument --kv-pairs: must be >= 0, got -1"),
        ("needle", "--trials", "0", "argument --trials: must be >= 1, got 0"),
        ("needle", "--depths", "1.5", "argument --depths: must be from 0 to 1"),
        ("needle", "--lengths", "0", "argument --lengths: must be >= 1"),
        ("speed", "--new-tokens", "1", "argument --new-tokens: must be >= 2"),
        ("speed", "--warmup", "-1", "argument --warmup: must be >= 0"),
        ("speed", "--batch", "x", "argument --batch: 'x' is not an integer"),
        ("memory", "--data", "no-such-set", "no text file or named set"),
        ("summarization", "--data", "no-such-set", "no summarization file or named set"),
        ("needle", "--kv-data", "no-such-set", "no KV-retrieval file or named set"),
        ("needle", "--haystack", "no-such-file.jsonl", "haystack essays not found at no-such-file.jsonl"),
    ],
)
def test_eval_input_errors_come_before_the_model_loads(monkeypatch, tmp_path, capsys, task, flag, value, message):
    from selkv import cli

    def never(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", never)
    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    extra = []
    if task == "needle" and flag != "--haystack":  # a haystack of its own: the check under test comes first anywhere
        essays = tmp_path / "essays.jsonl"
        essays.write_text(json.dumps({"text": "An essay."}) + "\n", encoding="utf-8")
        extra = ["--haystack", str(essays)]
    assert cli.main(["eval", task, "--out", str(tmp_path / "out"), flag, value, "--cache", "full", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written either


def test_eval_all_checks_its_inputs_before_the_model_loads(monkeypatch, tmp_path, capsys):
    from selkv import cli

    monkeypatch.setenv("SELKV_DATA", str(tmp_path / "no-data-here"))  # named sets without a download: pg19-morocco
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the input was checked"))
    monkeypatch.setattr(
        cli,
        "QUICK",
        (("perplexity", "perplexity", {"data": "pg19-morocco", "max_tokens": 64, "chunk": 8, "segments": 1}),),
    )
    monkeypatch.delenv("SELKV_DEBUG", raising=False)
    assert cli.main(["eval", "all", "--quick", "--out", str(tmp_path / "out")]) == 2
    assert "no text file or named set 'pg19-morocco'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model,attn,expected",
    [
        ("llama", ["--attn", "eager"], "eager"),  # the user's choice is kept
        ("llama", [], "selkv"),  # left out: selkv's attention, which a captured step needs
        # Falcon takes selkv's attention from transformers 5.25; before, it keeps sdpa.
        ("falcon-rope", [], "selkv" if falcon_uses_attention_interface() else "sdpa"),
    ],
)
def test_cli_static_keeps_the_attention_the_user_chose(capsys, monkeypatch, offline, models, model, attn, expected):
    """--static preallocates the cache with any attention; the memory line's held bytes and ratio agree."""
    import re

    from selkv import cli

    loaded = []
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda args: loaded.append(args.attn) or real_load(args))
    argv = [
        "generate",
        "--model",
        models[model],
        "--device",
        "cpu",
        "--prompt",
        "one two three",
        "--no-chat",
        "--max-new-tokens",
        "6",
        "--static",
        "--cache",
        "full",
        "--cache",
        "quant:bits=8,sink=1,window=2,block=1",
        *attn,
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert loaded == [expected] and out.count("(static)") == 2
    lines = re.findall(
        r"KV held ([\d.]+) (B|KiB|MiB) vs ([\d.]+) (B|KiB|MiB) for a 16-bit full cache "
        r"\(([\d.]+)x (smaller|larger)\)",
        out,
    )
    assert len(lines) == 2, out
    scale = {"B": 1, "KiB": 1024, "MiB": 2**20}
    for held, held_unit, full, full_unit, ratio, words in lines:
        held, full = float(held) * scale[held_unit], float(full) * scale[full_unit]
        assert (words == "smaller") == (held < full)
        assert float(ratio) == pytest.approx(max(held, full) / min(held, full), rel=0.06)


def test_compression_words_never_say_smaller_below_one():
    from selkv.cache import compression_words

    assert compression_words(3.125) == "3.12x smaller" or compression_words(3.125) == "3.13x smaller"
    assert compression_words(0.38) == "2.63x larger"
    assert compression_words(0.5) == "2.00x larger"
    assert compression_words(None) == "–" and compression_words(1.001) == "the same"


def test_selkv_attention_is_chosen_only_where_the_model_takes_it():
    from transformers import FalconConfig, Gemma2Config, LlamaConfig

    from selkv.models import takes_selkv_attention

    assert takes_selkv_attention(LlamaConfig())
    assert not takes_selkv_attention(Gemma2Config())  # softcapped attention logits
    assert not takes_selkv_attention(FalconConfig(alibi=True))  # position bias inside the mask
    assert takes_selkv_attention(FalconConfig()) == falcon_uses_attention_interface()

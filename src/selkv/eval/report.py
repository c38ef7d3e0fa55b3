"""``selkv report DIR...``: results folders -> one Markdown report with tables and PNG plots.

Every folder (searched recursively) holding a ``results.json`` becomes one table; plots are drawn
from the tasks that support them: memory vs new tokens (memory), perplexity vs bits (perplexity),
accuracy vs needle depth (needle).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cache import compression_words
from ..errors import SelKVError
from ..quant import SUPPORTED_NBITS
from ..specs import SpecError, parse_spec
from .results import RESULTS

MIB = 1024 * 1024


def find_results(dirs: list[str]) -> list[tuple[Path, dict]]:
    """(folder, results.json payload) of every results folder under ``dirs``, in a stable order."""
    found = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"no such results folder: {root}")
        paths = [root / RESULTS] if (root / RESULTS).exists() else sorted(root.rglob(RESULTS))
        if not paths:
            raise FileNotFoundError(f"no {RESULTS} in {root} or below")
        for path in paths:
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SelKVError(f"{path}: not valid JSON ({err})") from None
            check_payload(path, payload)
            found.append((path.parent, payload))
    return found


def check_payload(path: Path, payload) -> None:
    """Refuse a ``results.json`` that ``selkv eval`` did not write: the tables and plots index into it."""
    expected = (
        'expected {"task": str, "settings": {...}, "results": [{"cache": str, "metrics": {...}}, ...]} '
        "as written by `selkv eval`"
    )

    def bad(what: str):
        raise SelKVError(f"{path}: not a selkv results file ({what}); {expected}")

    if not isinstance(payload, dict):
        bad(f"the top level is a JSON {type(payload).__name__}, not an object")
    if not isinstance(payload.get("task"), str):
        bad("no 'task' string")
    if not isinstance(payload.get("settings", {}), dict):
        bad("'settings' is not an object")
    if not isinstance(payload.get("results"), list):
        bad("no 'results' list")
    for i, result in enumerate(payload["results"]):
        if not isinstance(result, dict) or not isinstance(result.get("cache"), str):
            bad(f"results[{i}] has no 'cache' string")
        if not isinstance(result.get("metrics") or {}, dict):
            bad(f"results[{i}]['metrics'] is not an object")


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    if value is None:
        return missing
    if not isinstance(value, (int, float)):  # a hand-edited or foreign value: show it as it is
        return str(value)
    return format(value, spec)


def _pct(value) -> str:
    return f"{value * 100:+.2f}%" if isinstance(value, (int, float)) else _fmt(value)


def _mib(value) -> str:
    return f"{value / MIB:.2f}" if isinstance(value, (int, float)) else _fmt(value)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _settings_line(payload: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in payload.get("settings", {}).items() if v is not None)
    env = payload.get("environment", {})
    where = f"; {env.get('device', '')} {env.get('dtype', '')}".rstrip() if env else ""
    partial = "" if payload.get("complete") else " **(incomplete run)**"
    groups = payload.get("default_groups") or {}
    groups = "; default groups: " + ", ".join(f"`{spec}` {group}" for spec, group in groups.items()) if groups else ""
    return f"Model `{payload.get('model')}`, data `{payload.get('data')}`; {settings}{where}{groups}.{partial}"


# KV bytes held against a 16-bit full cache of the same tokens: a float32 run's full cache is "2.00x larger".
COMPRESSION = "held vs 16-bit full"


def table_lines(payload: dict) -> list[str]:
    task, results = payload.get("task"), payload.get("results", [])
    s = payload.get("settings", {})
    m = [(r["cache"], r.get("metrics") or {}) for r in results]
    if task == "perplexity":
        title = (
            f"Perplexity, {s.get('data')}: {s.get('max_tokens')} tokens x {s.get('segments', 1)} segment(s), "
            f"chunk {s.get('chunk')}"
        )
        rows = [
            [
                f"`{c}`",
                _fmt(x.get("ppl"), ".3f"),
                _pct(x.get("ppl_vs_full")),
                _fmt(x.get("nll"), ".4f"),
                x.get("tokens", "–"),
                _mib(x.get("kv_bytes")),
                compression_words(x.get("compression")),
            ]
            for c, x in m
        ]
        header = ["cache", "ppl", "vs full", "NLL", "tokens", "KV MiB", COMPRESSION]
    elif task == "summarization":
        title = f"Summarization: ROUGE-L F1, {s.get('max_new_tokens')} new tokens, prefill chunk {s.get('chunk')}"
        rows = [
            [
                f"`{c}`",
                _fmt(x.get("rougeL"), ".4f"),
                _fmt(x.get("rougeL_diff_vs_full"), "+.4f"),
                _fmt(x.get("rougeL_vs_full"), ".3f"),
                _fmt(x.get("token_match_vs_full"), ".3f"),
                x.get("n", "–"),
                compression_words(x.get("compression")),
            ]
            for c, x in m
        ]
        header = ["cache", "ROUGE-L", "vs full", "ROUGE-L vs full output", "token match vs full", "n", COMPRESSION]
    elif task == "needle":
        lengths = [str(n) for n in s.get("lengths", [])]
        kv = any("kv_accuracy" in x for _, x in m)
        title = f"Needle: passkey accuracy by context length, prefill chunk {s.get('chunk')}"
        rows = [
            [
                f"`{c}`",
                _fmt(x.get("accuracy"), ".2f"),
                *[_fmt(x.get("by_length", {}).get(n), ".2f") for n in lengths],
                *([_fmt(x.get("kv_accuracy"), ".2f")] if kv else []),
                x.get("n", "–"),
                compression_words(x.get("compression")),
            ]
            for c, x in m
        ]
        header = [
            "cache",
            "accuracy",
            *[f"{n} tok" for n in lengths],
            *(["KV retrieval"] if kv else []),
            "n",
            COMPRESSION,
        ]
    elif task == "memory":
        title = f"KV memory after {s.get('prompt_tokens')} prompt + {s.get('new_tokens')} new tokens"
        cuda = any("peak_device_bytes" in x for _, x in m)
        rows = [
            [
                f"`{c}`",
                _mib(x.get("kv_bytes")),
                _mib(x.get("kv_bytes_full16")),
                compression_words(x.get("compression")),
                _mib(x.get("kv_bytes_16bit")),
                _mib(x.get("kv_bytes_codes")),
                _mib(x.get("kv_bytes_scales")),
                *([_mib(x.get("peak_device_bytes"))] if cuda else []),
            ]
            for c, x in m
        ]
        header = [
            "cache",
            "KV MiB",
            "16-bit full MiB",
            COMPRESSION,
            "16-bit part",
            "codes",
            "scales",
            *(["peak device MiB"] if cuda else []),
        ]
    elif task == "speed":
        title = (
            f"Speed: batch {s.get('batch')}, context {s.get('context')}, {s.get('new_tokens')} new tokens, "
            f"median of {s.get('repeats')} after {s.get('warmup')} warm-up"
        )
        rows = [
            [
                f"`{c}`",
                _fmt(x.get("prefill_tok_s"), ".0f"),
                _fmt(x.get("decode_tok_s"), ".1f"),
                _fmt(x.get("decode_speedup_vs_full"), ".2f"),
                compression_words(x.get("compression")),
            ]
            for c, x in m
        ]
        header = ["cache", "prefill tok/s", "decode tok/s", "decode vs full", COMPRESSION]
    elif task == "harness":
        tasks = list(s.get("tasks") or [])
        metric = next((x.get("metric") for _, x in m if x.get("metric")), "") or "score"
        chunk = s.get("chunk")
        title = (
            f"lm-evaluation-harness tasks ({metric}), "
            f"{f'prefill chunk {chunk}' if chunk else 'one pass (never reads a compressed cache)'}, "
            f"at most {s.get('limit') or 'all'} examples per task"
        )
        rows = [
            [
                f"`{c}`",
                *[_fmt(x.get("by_task", {}).get(t), ".2f") for t in tasks],
                _fmt(x.get("mean"), ".3f"),
                _fmt(x.get("mean_vs_full"), "+.3f"),
                x.get("n", "–"),
                _mib(x.get("kv_bytes")),
                compression_words(x.get("compression")),
            ]
            for c, x in m
        ]
        header = ["cache", *tasks, "mean", "vs full", "n", "KV MiB", COMPRESSION]
    elif task == KVPRESS_TASK:
        return kvpress_table_lines([payload])
    else:
        title, header, rows = f"{task}", ["cache", "metrics"], [[c, json.dumps(x)[:200]] for c, x in m]
    return [f"### {title}", "", _settings_line(payload), "", *_table(header, rows), ""]


# `python -m selkv.eval.peers` (selkv's side and kvpress's side, two environments): one table of both.
KVPRESS_TASK = "kvpress-peers"
KVPRESS_AXIS = "compression (1 - held / 16-bit full)"
PRESS_NAMES = {
    "snapkv": "SnapKV",
    "expected_attention": "ExpectedAttention",
    "streaming_llm": "StreamingLLM",
    "knorm": "Knorm",
    "none": "no press (full)",
}


def _kvpress_method(row: str) -> tuple[str, str]:
    """(method, the selkv spec whose bytes it matches) of a kvpress-peers row name."""
    if not row.startswith("kvpress:"):
        return f"selkv `{row}`", "itself"
    press, _, matched = row[len("kvpress:") :].partition("@")
    return f"kvpress {PRESS_NAMES.get(press, press)}", f"`{matched}`" if matched else "–"


def _compression_cell(x: dict) -> str:
    mean, low, high = (x.get(k) for k in ("compression_kvpress", "compression_kvpress_min", "compression_kvpress_max"))
    if not isinstance(mean, (int, float)):
        return _fmt(mean)
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high - low >= 0.005:
        return f"{mean:.2f} ({low:.2f}–{high:.2f})"
    return f"{mean:.2f}"


def kvpress_table_lines(payloads: list[dict]) -> list[str]:
    """One table of every kvpress-peers results file (selkv's rows, then kvpress's), on kvpress's memory axis."""
    first = payloads[0]
    s = first.get("settings", {})
    differs = [
        p.get("side", "?") for p in payloads[1:] if p.get("settings") != s or p.get("model") != first.get("model")
    ]
    title = (
        "kvpress presses beside selkv at equal KV memory (kvpress's protocol: the context prefilled once, "
        "each question answered against it)"
    )
    rows = []
    for payload in payloads:
        env = payload.get("environment", {})
        where = f"tf {env.get('transformers', '?')}" + (f", kvpress {env['kvpress']}" if env.get("kvpress") else "")
        for r in payload.get("results", []):
            x = r.get("metrics") or {}
            method, matched = _kvpress_method(r["cache"])
            rows.append(
                [
                    method,
                    matched,
                    _compression_cell(x),
                    _fmt(x.get("needle_accuracy"), ".2f"),
                    _fmt(x.get("qa_f1"), ".3f"),
                    _fmt(x.get("rougeL"), ".3f"),
                    x.get("n", "–"),
                    where,
                ]
            )
    header = ["method", "bytes matched to", KVPRESS_AXIS, "needle acc", "QA F1", "ROUGE-L", "n", "env"]
    lengths = ", ".join(str(n) for n in s.get("needle_lengths", []))
    line = (
        f"Model `{first.get('model')}`; needle {lengths} tokens x depths {s.get('needle_depths')}; "
        f"QA {s.get('qa_data')} {s.get('qa_docs')} papers x {s.get('qa_questions')} questions, first "
        f"{s.get('qa_context_tokens')} tokens (token F1); summarization {s.get('summ_data')} {s.get('summ_docs')} "
        f"articles (ROUGE-L). Compression: mean over contexts (range), after the context's prefill."
    )
    if any(not p.get("complete") for p in payloads):
        line += " **(incomplete run)**"
    if differs:
        line += f" **Warning: the {', '.join(differs)} side ran other settings or another model.**"
    return [f"### {title}", "", line, "", *_table(header, rows), ""]


def _bits(spec: str) -> int | None:
    try:
        parsed = parse_spec(spec)
    except SpecError:
        return None
    return parsed.bits


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure():
    """A figure with one axis, sized for a legend on its right."""
    return _plt().subplots(figsize=(9.5, 4.2))


def _save(fig, ax, path: Path, grid_which: str = "major") -> bool:
    ax.grid(alpha=0.3, which=grid_which)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


def plot_memory(payload: dict, path: Path) -> bool:
    series = [(r["cache"], r["metrics"].get("series")) for r in payload["results"] if r.get("metrics")]
    series = [(c, s) for c, s in series if s]
    if not series:
        return False
    fig, ax = _figure()
    for cache, points in series:
        ax.plot([p["new_tokens"] for p in points], [p["kv_bytes"] / MIB for p in points], label=cache, marker=".")
    ax.set_xlabel(f"new tokens (after a {payload.get('settings', {}).get('prompt_tokens')}-token prompt)")
    ax.set_ylabel("KV cache MiB")
    ax.set_title(f"KV memory vs new tokens ({payload.get('model')})")
    return _save(fig, ax, path)


def plot_perplexity(payload: dict, path: Path) -> bool:
    points = [(r["cache"], _bits(r["cache"]), r["metrics"].get("ppl")) for r in payload["results"] if r.get("metrics")]
    points = [p for p in points if p[2] is not None]
    if not points:
        return False
    fig, ax = _figure()
    families: dict[str, list[tuple[int, float]]] = {}
    for cache, bits, ppl in points:
        parsed = parse_spec(cache)
        if parsed.sweeps_bits:
            families.setdefault(parsed.family, []).append((bits, ppl))
        elif parsed.bits == 16:  # the 16-bit reference
            ax.axhline(ppl, color="black", lw=1, label="full (16-bit)")
        else:  # no bit width (eviction): a reference line too
            ax.axhline(ppl, color="gray", ls="--", lw=1, label=cache)
    for family, pts in families.items():
        pts.sort()
        ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=family)
    s = payload.get("settings", {})
    ax.set_xlabel("bits per quantized element")
    ax.set_xticks(list(SUPPORTED_NBITS))
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"Perplexity vs bits ({s.get('data')}, {s.get('max_tokens')} tokens, chunk {s.get('chunk')})")
    return _save(fig, ax, path, grid_which="both")


def plot_needle(payload: dict, path: Path) -> bool:
    rows = [(r["cache"], r["metrics"].get("by_depth")) for r in payload["results"] if r.get("metrics")]
    rows = [(c, d) for c, d in rows if d]
    if not rows:
        return False
    fig, ax = _figure()
    for i, (cache, by_depth) in enumerate(rows):
        depths = sorted(by_depth, key=float)
        # A small vertical offset per cache keeps overlapping lines visible.
        ax.plot(
            [float(d) for d in depths],
            [by_depth[d] + 0.01 * (i - len(rows) / 2) for d in depths],
            marker="o",
            label=cache,
        )
    lengths = ", ".join(str(n) for n in payload.get("settings", {}).get("lengths", []))
    ax.set_xlabel("needle depth (0 = start of the context, 1 = end)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Needle accuracy vs depth (contexts of {lengths} tokens)")
    return _save(fig, ax, path)


def plot_harness(payload: dict, path: Path) -> bool:
    """Mean harness score against the KV bytes held, one point per cache: the trade-off a user picks from."""
    rows = [(r["cache"], r["metrics"]) for r in payload["results"] if r.get("metrics")]
    rows = [(c, m) for c, m in rows if m.get("mean") is not None and m.get("kv_bytes")]
    if not rows:
        return False
    fig, ax = _figure()
    for i, (cache, m) in enumerate(rows):
        # A small vertical offset per cache keeps equal scores visible.
        ax.plot([m["kv_bytes"] / MIB], [m["mean"] + 0.01 * (i - len(rows) / 2)], marker="o", linestyle="", label=cache)
    tasks = ", ".join(payload.get("settings", {}).get("tasks", []))
    ax.set_xlabel("KV cache MiB held (mean per request, at its end)")
    ax.set_ylabel(f"mean {rows[0][1].get('metric') or 'score'}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Harness score vs KV memory ({tasks})")
    return _save(fig, ax, path)


PLOTS = {
    "harness": ("harness_score_vs_memory", plot_harness),
    "memory": ("memory_vs_tokens", plot_memory),
    "perplexity": ("ppl_vs_bits", plot_perplexity),
    "needle": ("needle_accuracy_vs_depth", plot_needle),
}


def run(dirs: list[str], out_dir: str | None = None, image_prefix: str | None = None) -> str:
    """Write ``report.md`` and PNG plots to ``out_dir`` (default: the first folder); return the Markdown.

    ``image_prefix`` is how report.md refers to the images (default: their file names).
    """
    found = find_results(dirs)
    out = Path(out_dir or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    lines = ["## Results", ""]
    counts: dict[str, int] = {}
    # Both sides of the kvpress comparison (two results folders) go in one table, selkv's rows first.
    peers = sorted((p for _, p in found if p.get("task") == KVPRESS_TASK), key=lambda p: p.get("side") != "selkv")
    for _folder, payload in found:
        if payload.get("task") == KVPRESS_TASK:
            if peers:
                lines += kvpress_table_lines(peers)
                peers = []
            continue
        lines += table_lines(payload)
        task = payload.get("task")
        if task in PLOTS:
            name, plot = PLOTS[task]
            counts[name] = counts.get(name, 0) + 1
            if counts[name] > 1:
                name = f"{name}_{counts[name]}"
            if plot(payload, out / f"{name}.png"):
                ref = f"{image_prefix.rstrip('/')}/{name}.png" if image_prefix else f"{name}.png"
                lines += [f"![{name}]({ref})", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text, encoding="utf-8")
    return text

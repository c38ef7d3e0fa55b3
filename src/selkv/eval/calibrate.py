"""Per-layer widths (``layer_bits``) for a model, chosen on a calibration text: ``selkv calibrate``.

A ``quant:`` spec (the base) stores every layer's middle at its ``kbits``/``vbits``; ``layer_bits`` gives some
layers wider codes. Which layers gain most is model-specific, so they are screened one at a time:

1. the chunked perplexity (:func:`selkv.eval.perplexity.score`) of the ``full`` cache and of the base on the
   first ``max_tokens`` tokens of the text;
2. the same with each quantized layer upgraded alone (``base,layer_bits=i:K/V``); layers the model keeps 16-bit
   (sliding-window layers) are skipped;
3. layers ranked by their gain (the base's perplexity minus theirs; ties by layer index), then chosen by the
   budget: ``layers=N`` takes the first N; ``min_ratio=R`` takes as many of the first-ranked layers as keep the
   bytes held at ``size_tokens`` tokens at least R times smaller than a 16-bit full cache, counted as ``selkv
   size`` counts them (:func:`selkv.sizing.cache_size`: a bfloat16 model, fed in chunks of ``chunk``); it never
   takes a layer whose upgrade did not lower the perplexity;
4. the chosen mix evaluated once.

``DIR/calibrate.json`` holds every run (summed NLL, tokens, perplexity, seconds), the ranking, the choice and
the settings; it is rewritten atomically after each run. A rerun with the same folder and settings skips the
runs it holds, so an interrupted screen resumes, and a new budget reuses the screen (only a new mix is run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SelKVError
from ..quant import SUPPORTED_NBITS
from ..shapes import layer_plan
from ..sizing import cache_size
from ..specs import QuantSpec, parse_spec
from ..specs.quant import layer_bits_text
from . import perplexity, report
from .results import SettingsMismatch, _clean, write_json_atomic
from .runner import environment, progress, resolution

TASK = "calibrate"
RESULTS = "calibrate.json"
PLOT = "calibrate.png"
DEFAULTS = {"data": "pg19-morocco", "max_tokens": 2048, "chunk": 64, "size_tokens": 4096}
SIZE_DTYPE = "bfloat16"  # the model dtype `selkv size` counts bytes for


def parse_upgrade(text: str) -> tuple[int, int]:
    """``K/V`` (key and value widths) as (K, V)."""
    kbits, slash, vbits = str(text).strip().partition("/")
    if not slash or not (kbits.isdigit() and vbits.isdigit()):
        raise SelKVError(f"--upgrade {text!r} is malformed; give KBITS/VBITS, e.g. 4/3")
    widths = int(kbits), int(vbits)
    for name, width in zip(("KBITS", "VBITS"), widths, strict=True):
        if width not in SUPPORTED_NBITS:
            raise SelKVError(
                f"--upgrade {text}: {name}={width} is not supported; allowed: {', '.join(map(str, SUPPORTED_NBITS))}"
            )
    return widths


def base_spec(text: str) -> QuantSpec:
    """The base spec of ``text``: a ``quant:`` spec without ``layer_bits``."""
    spec = parse_spec(text)
    if not isinstance(spec, QuantSpec):
        raise SelKVError(f"--cache {text!r} is a {spec.kind!r} cache; calibrate upgrades layers of a quant: spec")
    if spec.layer_bits:
        raise SelKVError(f"--cache {text!r} already sets layer_bits; give the spec without it (calibrate chooses it)")
    return spec


def check_upgrade(base: QuantSpec, upgrade: tuple[int, int]) -> None:
    """The upgrade must be at least as wide as the base on keys and values, and wider on one."""
    kbits, vbits = upgrade
    if kbits < base.kbits or vbits < base.vbits or (kbits, vbits) == (base.kbits, base.vbits):
        raise SelKVError(
            f"--upgrade {kbits}/{vbits} is not wider than the base's {base.kbits}/{base.vbits}; give key and value "
            "widths at least the base's, one of them wider"
        )


def with_layers(base_text: str, layers, upgrade: tuple[int, int]) -> str:
    """The base spec text with ``layers`` at the ``upgrade`` widths (the text itself when there are none)."""
    base_text = base_text.strip().rstrip(",")
    if not layers:
        return base_text
    items = tuple(sorted((layer, *upgrade) for layer in layers))
    return f"{base_text},layer_bits={layer_bits_text(items)}"


def held(spec_text: str, config, tokens: int, chunk: int) -> dict:
    """``selkv size``'s count of ``spec_text`` at ``tokens`` tokens: ``allocated``, ``full16``, ``compression``."""
    counted = cache_size(spec_text, config, tokens, chunk=chunk)
    return {key: counted[key] for key in ("allocated", "full16", "compression")}


@dataclass(frozen=True)
class Plan:
    """Everything checked before a perplexity runs: the base, the widths, the layers to screen and the budget."""

    base_text: str
    upgrade: tuple[int, int]
    layers: tuple[int, ...]  # the quantized (full-attention) layers, screened one at a time
    skipped: tuple[tuple[int, str], ...]  # (layer, type) of the layers the model keeps 16-bit
    min_ratio: float | None
    count: int | None  # --layers
    size_tokens: int
    size_chunk: int
    base_held: dict
    one_layer_held: dict  # the base with the first screened layer upgraded

    @property
    def upgrade_text(self) -> str:
        return f"{self.upgrade[0]}/{self.upgrade[1]}"

    def layer_spec(self, layer: int) -> str:
        return with_layers(self.base_text, [layer], self.upgrade)

    def budget(self) -> dict:
        return {
            "min_ratio": self.min_ratio,
            "layers": self.count,
            "size_tokens": self.size_tokens,
            "size_chunk": self.size_chunk,
            "size_dtype": SIZE_DTYPE,
        }


def make_plan(
    cache: str,
    upgrade: str,
    config,
    min_ratio: float | None = None,
    layers: int | None = None,
    size_tokens: int = DEFAULTS["size_tokens"],
    size_chunk: int = DEFAULTS["chunk"],
) -> Plan:
    """Check a calibration against the model ``config`` (no forward pass); raises :class:`SelKVError`."""
    if (min_ratio is None) == (layers is None):
        raise SelKVError("give one budget: --min-ratio R or --layers N")
    if size_tokens < 1 or size_chunk < 1:
        raise SelKVError(f"--size-tokens and --chunk must be >= 1, got {size_tokens} and {size_chunk}")
    base = base_spec(cache)
    widths = parse_upgrade(upgrade)
    check_upgrade(base, widths)
    resolved = base.resolve(config)  # the base's widths, group and rotations fit the model
    if resolved.late_layers and widths[0] < resolved.late_kbits:
        raise SelKVError(
            f"--upgrade {widths[0]}/{widths[1]} has narrower keys than the base's later layers "
            f"(late_kbits={resolved.late_kbits}); give keys of at least {resolved.late_kbits} bits, or "
            f"late_kbits={base.kbits} in --cache to turn that rule off"
        )
    plan = layer_plan(config)
    # a later layer already at the upgrade's widths (late_kbits) has nothing to screen
    same = {i for i in resolved.late_layers if widths == (resolved.late_kbits, base.vbits)}
    screened = tuple(i for i, (layer_type, _) in enumerate(plan) if layer_type == "full_attention" and i not in same)
    skipped = tuple((i, layer_type) for i, (layer_type, _) in enumerate(plan) if layer_type != "full_attention")
    if not screened and same:
        raise SelKVError(
            f"every full-attention layer already stores {widths[0]}/{widths[1]} keys/values (late_kbits="
            f"{resolved.late_kbits}); nothing to screen: give another --upgrade, or late_kbits={base.kbits} in --cache"
        )
    if not screened:
        raise SelKVError("this model has no full-attention layers; selkv keeps every one of its layers 16-bit")
    if layers is not None and not 1 <= layers <= len(screened):
        raise SelKVError(
            f"--layers {layers}: this model has {len(screened)} quantized layers"
            + (f" ({len(skipped)} sliding-window layers stay 16-bit)" if skipped else "")
            + f"; give 1 to {len(screened)}"
        )
    base_text = cache.strip().rstrip(",")
    parse_spec(with_layers(base_text, [screened[0]], widths)).resolve(config)  # the upgrade's widths fit too
    base_held = held(base_text, config, size_tokens, size_chunk)
    one_layer = held(with_layers(base_text, [screened[0]], widths), config, size_tokens, size_chunk)
    if min_ratio is not None:
        if not min_ratio > 0:
            raise SelKVError(f"--min-ratio must be > 0, got {min_ratio}")
        at = f"at {size_tokens} tokens"
        if base_held["compression"] < min_ratio:
            raise SelKVError(
                f"--min-ratio {min_ratio:g}: the base itself holds only {base_held['compression']:.3f}x less than a "
                f"16-bit full cache {at} ({base_held['allocated']:,} bytes vs {base_held['full16']:,}); "
                "give a lower ratio or a narrower base"
            )
        cheapest = one_layer  # a later layer of a late_kbits rule (its keys already wider) costs less
        late = next((i for i in resolved.late_layers if i in screened), None)
        if late is not None:
            late_held = held(with_layers(base_text, [late], widths), config, size_tokens, size_chunk)
            cheapest = max(cheapest, late_held, key=lambda counted: counted["compression"])
        if cheapest["compression"] < min_ratio:
            raise SelKVError(
                f"--min-ratio {min_ratio:g} leaves room for no layer: the base holds {base_held['compression']:.3f}x "
                f"less than a full cache {at}, one {widths[0]}/{widths[1]} layer takes it to "
                f"{cheapest['compression']:.3f}x at most; give a lower ratio"
            )
    return Plan(base_text, widths, screened, skipped, min_ratio, layers, size_tokens, size_chunk, base_held, one_layer)


def rank(rows: list[dict]) -> list[dict]:
    """Layer rows (``layer``, ``gain``) best first: the largest gain, ties by layer index."""
    return sorted(rows, key=lambda row: (-row["gain"], row["layer"]))


class Sizes:
    """:func:`held` of each spec text at the plan's size, each counted once."""

    def __init__(self, plan: Plan, config):
        self.plan, self.config = plan, config
        self.counted = {plan.base_text: plan.base_held, plan.layer_spec(plan.layers[0]): plan.one_layer_held}

    def count(self, spec_text: str) -> dict:
        if spec_text not in self.counted:
            self.counted[spec_text] = held(spec_text, self.config, self.plan.size_tokens, self.plan.size_chunk)
        return self.counted[spec_text]

    def __call__(self, layers) -> dict:
        """The base with ``layers`` upgraded."""
        return self.count(with_layers(self.plan.base_text, layers, self.plan.upgrade))


def choose(ranked: list[dict], plan: Plan, sizes: Sizes) -> list[int]:
    """The layers the budget takes from ``ranked`` (best first), in rank order.

    ``--layers N``: the first N. ``--min-ratio R``: the longest run of first-ranked layers, each with a positive
    gain, whose mix still holds at least R times less than a 16-bit full cache (counted by ``sizes``)."""
    if plan.count is not None:
        return [row["layer"] for row in ranked[: plan.count]]
    chosen: list[int] = []
    for row in ranked:
        if row["gain"] <= 0 or sizes([*chosen, row["layer"]])["compression"] < plan.min_ratio:
            break
        chosen.append(row["layer"])
    return chosen


def _score(model, ids: list[int], spec_text: str, chunk: int) -> dict:
    """One perplexity run of ``spec_text``: summed NLL, tokens, NLL per token, perplexity and seconds."""
    started = time.perf_counter()
    nll_sum, tokens, _ = perplexity.score(model, ids, spec_text, chunk)
    metrics = perplexity.aggregate([{"nll_sum": nll_sum, "tokens": tokens}])
    return {
        "nll_sum": nll_sum,
        "tokens": tokens,
        "nll": metrics["nll"],
        "ppl": metrics["ppl"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def previous_runs(path: Path, model_name: str, settings: dict) -> dict[str, dict]:
    """The finished runs of an earlier calibration in ``path`` (none if there is no file); refuses a file of
    another model or other settings (the budget may differ: the screen does not depend on it)."""
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingsMismatch(f"{path} is not valid JSON ({err}); use a fresh --out folder") from None
    if not isinstance(previous, dict) or previous.get("task") != TASK or not isinstance(previous.get("runs"), dict):
        raise SettingsMismatch(f"{path} was not written by selkv calibrate; use a fresh --out folder")
    mine = {"model": model_name, "settings": settings}
    diff = [key for key in mine if previous.get(key) != mine[key]]
    if diff:
        raise SettingsMismatch(
            f"{path.parent} holds a calibration with a different {', '.join(diff)} "
            f"({json.dumps(previous.get(diff[0]))[:200]}); resume with the same options or use a fresh --out folder"
        )
    runs = previous["runs"]
    keys = ("nll_sum", "tokens", "nll", "ppl")
    return {
        spec: run
        for spec, run in runs.items()
        if isinstance(run, dict) and all(isinstance(run.get(k), (int, float)) for k in keys)
    }


def layer_rows(plan: Plan, runs: dict[str, dict], sizes: Sizes) -> list[dict]:
    """One row per screened layer whose run is finished, by layer: its run, its change against ``full`` and the
    base, its gain (the base's perplexity minus its own) and the bytes it holds."""
    full, base = runs.get("full"), runs.get(plan.base_text)
    rows = []
    for layer in plan.layers:
        run = runs.get(plan.layer_spec(layer))
        if run is None:
            continue
        counted = sizes([layer])
        row = {"layer": layer, "spec": plan.layer_spec(layer), **run}
        if full is not None:
            row["ppl_vs_full"] = run["ppl"] / full["ppl"] - 1.0
        if base is not None:
            row["ppl_vs_base"] = run["ppl"] / base["ppl"] - 1.0
            row["gain"] = base["ppl"] - run["ppl"]
        rows.append({**row, "held_bytes": counted["allocated"], "compression": counted["compression"]})
    return rows


def _summary(spec_text: str, runs: dict, counted: dict) -> dict:
    run, full = runs[spec_text], runs["full"]
    return {
        "spec": spec_text,
        **run,
        "ppl_vs_full": run["ppl"] / full["ppl"] - 1.0,
        "held_bytes": counted["allocated"],
        "full16_bytes": counted["full16"],
        "compression": counted["compression"],
    }


def payload(plan: Plan, header: dict, runs: dict[str, dict], sizes: Sizes, complete: bool = False) -> dict:
    """``calibrate.json``: the header (task, model, data, settings, budget, command, environment), every run, the
    layer rows, and once the screen is complete the ranking, the choice and the mix."""
    rows = layer_rows(plan, runs, sizes)
    out = {
        **header,
        "budget": plan.budget(),
        "upgrade": plan.upgrade_text,
        "complete": complete,
        "screened_layers": list(plan.layers),
        "skipped_layers": [{"layer": layer, "type": layer_type} for layer, layer_type in plan.skipped],
        "runs": runs,
    }
    if "full" in runs:
        out["full"] = _summary("full", runs, sizes.count("full"))
    if plan.base_text in runs and "full" in runs:
        out["base"] = _summary(plan.base_text, runs, sizes([]))
    screened = len(rows) == len(plan.layers) and "base" in out
    if screened:
        ranked = rank(rows)
        for position, row in enumerate(ranked, 1):
            row["rank"] = position
        chosen = choose(ranked, plan, sizes)
        out["ranking"] = [row["layer"] for row in ranked]
        out["chosen"] = chosen
        for row in rows:
            row["chosen"] = row["layer"] in chosen
        mix = with_layers(plan.base_text, chosen, plan.upgrade)
        out["spec"] = mix
        if mix in runs:
            out["mix"] = {"layers": sorted(chosen), **_summary(mix, runs, sizes(chosen))}
    out["layers"] = rows
    return out


def calibrate(
    model,
    tokenizer,
    cache: str,
    upgrade: str,
    out_dir: str | Path,
    *,
    data: str = DEFAULTS["data"],
    max_tokens: int = DEFAULTS["max_tokens"],
    chunk: int = DEFAULTS["chunk"],
    min_ratio: float | None = None,
    layers: int | None = None,
    size_tokens: int = DEFAULTS["size_tokens"],
    model_name: str = "",
    command: str = "",
) -> dict:
    """Screen each quantized layer of ``model`` upgraded alone, choose by the budget, evaluate the mix; returns
    ``DIR/calibrate.json``'s payload (see the module docstring). ``cache``: the base ``quant:`` spec; ``upgrade``:
    ``K/V``; one of ``min_ratio`` and ``layers``."""
    perplexity.check({"data": data, "max_tokens": max_tokens, "chunk": chunk, "segments": 1})
    plan = make_plan(cache, upgrade, model.config, min_ratio, layers, size_tokens, chunk)
    sizes = Sizes(plan, model.config)
    device = getattr(model, "device", "cpu")
    settings = {
        "data": data,
        "max_tokens": max_tokens,
        "chunk": chunk,
        "cache": plan.base_text,
        # what the base means on this model: a folder screened under other defaults is another calibration
        "resolved": resolution(plan.base_text, model.config),
        "upgrade": plan.upgrade_text,
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "device": str(device),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    runs = previous_runs(path, model_name, settings)
    segments, source = perplexity.load_segments(tokenizer, data, max_tokens, 1)
    ids = segments[0]
    header = {"task": TASK, "model": model_name, "data": source, "settings": settings, "command": command}
    header["environment"] = environment(model)
    specs = ["full", plan.base_text, *(plan.layer_spec(layer) for layer in plan.layers)]
    if runs:
        print(f"resuming {out}: {sum(spec in runs for spec in specs)} of {len(specs)} screen runs found")
    started = time.time()
    todo = [spec for spec in specs if spec not in runs]
    desc = f"calibrate ({len(plan.layers)} layers, {max_tokens} tokens, chunk {chunk})"
    for spec in progress(todo, desc=desc, unit="run"):
        runs[spec] = _score(model, ids, spec, chunk)
        write_json_atomic(path, _clean(payload(plan, header, runs, sizes)))
    mix = payload(plan, header, runs, sizes)["spec"]
    if mix not in runs:
        for spec in progress([mix], desc="calibrate (the chosen mix)", unit="run"):
            runs[spec] = _score(model, ids, spec, chunk)
    header["seconds_this_run"] = round(time.time() - started, 1)
    final = _clean(payload(plan, header, runs, sizes, complete=True))
    write_json_atomic(path, final)
    plot(final, out / PLOT)
    return final


def _mib(counted: dict) -> str:
    return f"{counted['held_bytes'] / 2**20:.2f} MiB, {counted['compression']:.2f}x"


def table_lines(result: dict) -> list[str]:
    """The screen as a Markdown table (one row per layer, by layer), the choice, and the chosen spec alone on the
    last line."""
    s, budget = result["settings"], result["budget"]
    full, base = result["full"], result["base"]
    lines = [
        f"Calibration of {s['cache']} with {result['upgrade']} layers: {result['model']}, {result['data']} "
        f"({s['max_tokens']} tokens, chunk {s['chunk']}, {s['dtype']}); held at {budget['size_tokens']} tokens",
        "",
        "| layer | ppl | vs full | gain | rank | held |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| full | {full['ppl']:.3f} | | | | {_mib(full)} |",
        f"| base | {base['ppl']:.3f} | {base['ppl_vs_full'] * 100:+.2f}% | | | {_mib(base)} |",
    ]
    rows = {row["layer"]: row for row in result["layers"]}
    skipped = {entry["layer"]: entry["type"] for entry in result["skipped_layers"]}
    for layer in sorted([*rows, *skipped]):
        if layer in skipped:
            lines.append(f"| {layer} | | | | | {skipped[layer]}, kept 16-bit |")
            continue
        row = rows[layer]
        mark = "**" if row.get("chosen") else ""
        lines.append(
            f"| {mark}{layer}{mark} | {row['ppl']:.3f} | {row['ppl_vs_full'] * 100:+.2f}% | {row['gain']:+.4f} | "
            f"{row['rank']} | {_mib(row)} |"
        )
    mix = result["mix"]
    chosen = result["chosen"]
    lines.append(
        f"| mix {', '.join(map(str, sorted(chosen))) or '(none)'} | {mix['ppl']:.3f} | "
        f"{mix['ppl_vs_full'] * 100:+.2f}% | {base['ppl'] - mix['ppl']:+.4f} | | {_mib(mix)} |"
    )
    if budget["layers"] is not None:
        rule = f"the {budget['layers']} first-ranked layers"
    else:
        rule = f"the first-ranked layers that lower the perplexity and keep >= {budget['min_ratio']:g}x"
    lines += [
        "",
        f"chosen ({rule}), by rank: {', '.join(map(str, chosen)) or 'none'}",
        f"mix: ppl {mix['ppl']:.3f} ({mix['ppl_vs_full'] * 100:+.2f}% vs full; the base "
        f"{base['ppl_vs_full'] * 100:+.2f}%), "
        f"{mix['held_bytes']:,} bytes held vs {mix['full16_bytes']:,} for full ({mix['compression']:.3f}x)",
    ]
    return lines


def plot(result: dict, path: Path) -> bool:
    """A bar per screened layer: its perplexity change against the base, the chosen layers highlighted. False
    when matplotlib is not installed (the JSON holds every number)."""
    rows = result.get("layers") or []
    if not rows or "chosen" not in result:
        return False
    try:
        fig, ax = report._figure()
    except ImportError:
        return False
    for chosen, color, label in ((False, "tab:gray", "not chosen"), (True, "tab:orange", "chosen")):
        picked = [row for row in rows if row.get("chosen", False) == chosen]
        if picked:
            ax.bar(
                [row["layer"] for row in picked],
                [row["ppl_vs_base"] * 100 for row in picked],
                color=color,
                label=label,
            )
    mix = result.get("mix")
    if mix is not None:
        change = (mix["ppl"] / result["base"]["ppl"] - 1.0) * 100
        ax.axhline(change, color="tab:orange", ls="--", lw=1, label=f"the chosen mix ({change:+.2f}%)")
    ax.axhline(0, color="black", lw=0.8)
    s = result["settings"]
    ax.set_xlabel("layer upgraded alone")
    ax.set_ylabel("perplexity change vs the base (%)")
    ax.set_title(
        f"{result['upgrade']} in one layer of {s['cache']}\n({result['data']}, {s['max_tokens']} tokens, "
        f"chunk {s['chunk']})",
        fontsize=8,
    )
    return report._save(fig, ax, path)

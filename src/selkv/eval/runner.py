"""Runs one task module over cache specs into a run folder: writer, resume, profiling, progress, environment.

Every task module has ``TASK``, ``DEFAULTS``, ``add_arguments``, ``settings_from_args``,
``run(model, tokenizer, specs, writer, **settings)``, ``aggregate``, and optionally ``compare`` and
``check(settings)`` (input errors found before the model loads). A module's ``run`` gets ``specs`` as an ordered
mapping name -> spec object, parsed once: its results are named by the name (the text as the user wrote it) and
its caches built from the object (``make_cache(specs[name], config)``).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from ..cache import resolve_spec
from ..specs import CacheSpec, NamedSpecs, named_specs
from .results import ResultsWriter


def progress(iterable=None, **kwargs):
    """tqdm progress bar (stderr); quiet when SELKV_NO_PROGRESS is set."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=bool(os.environ.get("SELKV_NO_PROGRESS")), dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def maybe_profile(profile_dir: str | None):
    """Profile the block with torch.profiler when ``profile_dir`` is given (see :mod:`selkv.eval.profile`)."""
    if not profile_dir:
        yield
        return
    from .profile import profiled

    with profiled(profile_dir):
        yield


def run_task(
    module,
    model,
    tokenizer,
    model_name: str,
    specs: NamedSpecs,
    out_dir: str,
    settings: dict,
    profile_dir: str | None = None,
) -> dict:
    """Run one task module over ``specs`` into ``out_dir``; returns the final ``results.json`` payload.

    ``specs``: spec strings, or (name, spec) pairs / a mapping name -> spec (:func:`selkv.specs.named_specs`); a
    repeated name runs once."""
    specs = spec_dict(specs)
    started = time.time()
    writer = ResultsWriter(
        out_dir,
        module.TASK,
        model_name,
        settings,
        specs,
        module.aggregate,
        compare=getattr(module, "compare", None),
        resolved={name: resolution(spec, model.config) for name, spec in specs.items()},
    )
    if writer.resumed:
        print(f"resuming {out_dir}: {writer.resumed} finished example(s) found")
    with maybe_profile(profile_dir):
        module.run(model, tokenizer, specs, writer, **settings)
    writer.extra.setdefault("environment", environment(model))
    writer.extra["default_groups"] = default_groups(specs, model.config)
    writer.extra["seconds_this_run"] = round(time.time() - started, 1)
    return writer.flush(complete=True)


def resolution(spec: CacheSpec, config) -> str:
    """What a spec means on this model, as a run folder records it: the spec with the model's defaults filled in, and
    the layers a later-layer rule (``late_kbits``) widens, which the canonical string leaves to the rule."""
    resolved = resolve_spec(spec, config)
    late = getattr(resolved, "late_layers", ())
    return f"{resolved} late_layers={','.join(map(str, late))}" if late else str(resolved)


def spec_dict(specs: NamedSpecs) -> dict[str, CacheSpec]:
    """``specs`` as an ordered mapping name -> spec, each name once (its first spec), each string parsed once."""
    out: dict[str, CacheSpec] = {}
    for name, spec in named_specs(specs):
        out.setdefault(name, spec)
    return out


def environment(model) -> dict:
    import platform

    import transformers

    device = getattr(model, "device", torch.device("cpu"))
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_groups(specs: NamedSpecs, config) -> dict[str, int]:
    """The group size each spec that does not set one gets on this model (it depends on head_dim), by name."""
    groups = {}
    for name, spec in spec_dict(specs).items():
        if not spec.is_resolved and not spec.group:
            groups[name] = resolve_spec(spec, config).group
    return groups

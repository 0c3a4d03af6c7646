"""``headlens.load(source)``: one entry point for every way to get a :class:`HeadlensModel`.

``source`` may be, in the order tried:

1. a :class:`HeadlensModel` (returned, moved to ``device`` / ``dtype`` if given);
2. a TransformerLens ``TransformerBridge`` (its underlying ``original_model`` and tokenizer);
3. an in-memory ``transformers`` ``PreTrainedModel`` (pass its tokenizer as ``tokenizer=``);
4. a bundled name (``headlens.list_models()``);
5. a folder: a headlens checkpoint (:mod:`headlens.io.native`), or a ``transformers``
   checkpoint (``config.json`` + safetensors, plus its tokenizer), including folders written by
   :func:`headlens.io.to_hf.save_hf` for physically pruned models;
6. a ``.gguf`` file (:func:`headlens.io.gguf.load_gguf`: dequantized by ``transformers``, cached);
7. otherwise a Hugging Face hub name, loaded by ``transformers`` (needs a connection or a cache).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Optional

import torch

from headlens.errors import HeadlensError
from headlens.io.bundled import bundled_models
from headlens.io.digest import source_path
from headlens.io.from_hf import from_hf_model, from_hf_state
from headlens.io.gguf import load_gguf
from headlens.io.hf_folders import load_transformers_folder, load_with_transformers
from headlens.io.native import is_headlens_folder, load_model
from headlens.io.tokenizers import check_vocab, load_tokenizer
from headlens.model.config import parse_device, parse_dtype
from headlens.model.transformer import HeadlensModel

_HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def load(source, dtype=None, device=None, tokenizer=None,
         truncate_ctx: Optional[int] = None, device_map=None, max_memory=None) -> HeadlensModel:
    """Load ``source`` (see the module docstring) as a :class:`HeadlensModel` in eval mode.

    dtype: torch dtype or name; default: the checkpoint's own dtype. device: where the weights go
    (default CPU). tokenizer: for in-memory ``transformers`` models. truncate_ctx: keep only the
    first ``truncate_ctx`` learned positions (a smaller ``n_ctx``). device_map: a model larger
    than one device, its blocks over several (``"auto"`` under ``max_memory``, or ``{layer:
    device}``; see :meth:`HeadlensModel.place`); the weights are read on the CPU first.
    """
    dtype = parse_dtype(dtype)
    parse_device(device)
    if device_map is not None and device is not None and str(device) != "cpu":
        raise HeadlensError("give device or device_map, not both (device_map names every block's device)")
    model = _dispatch(source, dtype, None if device_map is not None else device, tokenizer)
    check_vocab(model)
    if truncate_ctx is not None:
        model = truncate_context(model, truncate_ctx)
    if device_map is not None:
        model.place(device_map, max_memory)
    if isinstance(source, (str, os.PathLike)):
        model.loaded_from = source_path(source)  # save_hf / save_model never write over it
    return model


def _dispatch(source, dtype, device, tokenizer) -> HeadlensModel:
    if isinstance(source, HeadlensModel):
        return source.to(device=device or source.device, dtype=dtype or source.dtype)
    if hasattr(source, "original_model") and hasattr(source, "run_with_cache"):
        return from_bridge(source, tokenizer, dtype, device)
    if hasattr(getattr(source, "config", None), "model_type") and isinstance(source, torch.nn.Module):
        return from_hf_model(source, tokenizer, dtype, device)
    if not isinstance(source, (str, os.PathLike)):
        raise HeadlensError(f"source must be a model name, a folder, a transformers model or a "
                            f"TransformerBridge, got {type(source).__name__}")
    bundled = bundled_models()
    if isinstance(source, str) and source in bundled:
        return bundled[source].loader(dtype=dtype, device=device)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_folder(path, dtype, device)
    if path.is_file() and path.suffix.lower() == ".gguf":
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
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadlensError(f"folder {str(folder)!r} does not exist")
    if is_headlens_folder(folder):
        return load_model(folder, dtype=dtype, device=device)
    return load_transformers_folder(folder, dtype, device)


def load_hub(name: str, dtype=None, device=None) -> HeadlensModel:
    """A Hugging Face hub model through ``transformers`` (online, or from the local cache)."""
    from transformers import AutoConfig

    from headlens.io.families import family_for_model_type

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadlensError(
            f"cannot load {name!r}: it is not a bundled model, not an existing folder, and the Hugging "
            f"Face hub did not provide it ({first}){_bundled_hint(name, always=True)}") from e
    family = family_for_model_type(config.model_type)
    tokenizer = load_tokenizer(name)
    return load_with_transformers(name, config, family, tokenizer, dtype, device, name)


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

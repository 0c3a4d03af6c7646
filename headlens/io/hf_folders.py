"""Reading ``transformers`` checkpoint folders: ``config.json``, safetensors weights (one file or
shards), the tokenizer; other weight formats go through ``transformers`` itself."""
from __future__ import annotations

import json
import pickle  # only for its exception: nothing here unpickles
import warnings
from pathlib import Path
from typing import Optional

from headlens.errors import HeadlensError
from headlens.io.from_hf import from_hf_model, from_hf_state
from headlens.io.tokenizers import load_tokenizer
from headlens.model.heads import keep_heads
from headlens.model.transformer import HeadlensModel


def load_transformers_folder(folder, dtype=None, device=None, name: Optional[str] = None) -> HeadlensModel:
    """A ``transformers`` checkpoint folder: ``config.json``, safetensors weights (one file or an
    index of shards; ``pytorch_model.bin`` goes through ``transformers``), and its tokenizer.

    Safetensors are read directly (no ``transformers`` model is built), which keeps loading fast and
    reads the physically pruned folders of :func:`headlens.io.to_hf.save_hf` (``config.json`` key
    ``"headlens_kept_heads"``), which stock ``transformers`` cannot instantiate, and slices the
    zero heads out of its padded ones (``"headlens_padded_kept_heads"``).
    """
    folder = Path(folder)
    raw = _read_config(folder)
    family = _family_of(raw, folder)
    config = _hf_config(folder, raw)
    tokenizer = load_tokenizer(folder)
    kept, padded = raw.get("headlens_kept_heads"), raw.get("headlens_padded_kept_heads")
    name = name or folder.name
    state = _read_safetensors(folder)
    if state is None:
        if kept is not None or padded is not None:
            raise HeadlensError(f"pruned checkpoint {str(folder)!r} has no model.safetensors")
        return load_with_transformers(str(folder), config, family, tokenizer, dtype, device, name,
                                       local_files_only=True)
    try:
        model = from_hf_state(config, state, tokenizer, dtype, device, name, kept_heads=kept)
        return keep_heads(model, padded) if padded is not None else model
    except HeadlensError:
        if kept is not None or padded is not None:
            raise
        # weight names this fast path does not know (e.g. legacy checkpoints): let transformers map them
        return load_with_transformers(str(folder), config, family, tokenizer, dtype, device, name,
                                       local_files_only=True)


def load_with_transformers(where: str, config, family, tokenizer, dtype, device, name, **kwargs):
    import transformers

    from headlens.io.families.base import hf_weight_names

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or getattr(transformers, family.hf_class)
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            hf, info = cls.from_pretrained(where, config=config, attn_implementation="eager", dtype=dtype,
                                           output_loading_info=True, **kwargs)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
        raise HeadlensError(f"refused to load the weights in {where!r}: its pickle file (pytorch_model.bin) holds "
                            "objects other than tensors, which could run code; nothing was run. Use a safetensors "
                            "checkpoint") from None
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


# --- helpers ----------------------------------------------------------------------------------
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
    from headlens.io.families import FAMILIES, family_for_model_type

    try:
        return family_for_model_type(raw["model_type"])
    except HeadlensError:
        supported = {f.name: list(f.model_types) for f in FAMILIES.values()}
        raise HeadlensError(f"unsupported architecture: {str(folder)!r} holds a model_type "
                            f"{raw['model_type']!r} model; headlens reads {supported}") from None


def _hf_config(folder: Path, raw: dict):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # e.g. n_head: "four"
        detail = " ".join(str(e).split())  # one line
        raise HeadlensError(f"{str(folder / 'config.json')!r} could not be read by transformers: {detail}") from None


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

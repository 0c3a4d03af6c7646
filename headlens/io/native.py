"""headlens' own checkpoint folder: ``config.json`` (a :class:`ModelConfig` plus ``"format":
"headlens"``), ``model.safetensors``, the tokenizer files when the model has a tokenizer, and an
optional model card (``card.json`` / ``card.md``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from headlens.errors import HeadlensError
from headlens.io.tokenizers import load_tokenizer
from headlens.model.config import ModelConfig
from headlens.model.transformer import HeadlensModel
from headlens.storage.folders import write_model_folder

FORMAT = "headlens"


def _headlens_config(folder: Path) -> Optional[dict]:
    """The parsed ``config.json`` of a headlens checkpoint folder; None if it is not one."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("format") == FORMAT else None


def is_headlens_folder(folder) -> bool:
    return _headlens_config(Path(folder)) is not None


def save_model(model: HeadlensModel, folder, card: Optional[dict] = None, card_md: Optional[str] = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` (and its tokenizer and card) to ``folder``: a new or empty folder, or with
    ``overwrite`` one whose contents are replaced -- never the folder the model was loaded from
    (see :func:`headlens.storage.folders.write_model_folder`; the folder appears complete or not at all)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "unembed.W_U"}
    config = dict(model.cfg.to_dict(), format=FORMAT)

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(folder))
        if card is not None:
            (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        if card_md is not None:
            (folder / "card.md").write_text(card_md)

    return write_model_folder(folder, write, overwrite, getattr(model, "loaded_from", None))


def load_model(folder, dtype: Optional[torch.dtype] = None, device=None) -> HeadlensModel:
    """Read a folder written by :func:`save_model`."""
    folder = Path(folder)
    raw = _headlens_config(folder)
    if raw is None:
        raise HeadlensError(f"{str(folder)!r} is not a headlens checkpoint folder (no config.json with "
                            f"\"format\": \"{FORMAT}\")")
    raw.pop("format")
    try:
        cfg = ModelConfig.from_dict(raw)
    except HeadlensError as e:
        raise HeadlensError(f"{str(folder / 'config.json')!r}: {e}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise HeadlensError(f"checkpoint {str(folder)!r} has no model.safetensors")
    try:
        state = load_file(str(weights), device=str(device or "cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadlensError(f"checkpoint file {str(weights)!r} is corrupted or truncated: {e}") from e
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    tokenizer = load_tokenizer(folder)  # None when the folder holds no tokenizer files
    return HeadlensModel.from_state_dict(cfg, state, tokenizer)  # refuses NaN / infinite weights


def read_card(folder) -> Optional[dict]:
    path = Path(folder) / "card.json"
    return json.loads(path.read_text()) if path.is_file() else None



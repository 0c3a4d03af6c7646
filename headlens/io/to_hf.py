"""Write a :class:`HeadlensModel` as a ``transformers`` checkpoint folder.

``save_hf(model, folder)`` writes ``config.json`` (the family's ``transformers`` config),
``model.safetensors`` (``transformers`` weight names, built by inverting the family's weight
rules, see :func:`headlens.io.families.base.invert_state_dict`) and the tokenizer files.

Physically pruned models (``cfg.kept_heads`` set) are written with their attention weights sliced
along the head dimension and ``"headlens_kept_heads"`` in ``config.json``. Stock ``transformers``
5.x cannot instantiate per-layer head counts (``prune_heads`` is gone), so such a folder is read back
with ``headlens.load(folder)``; unpruned folders load in plain ``transformers`` as well.

``save_hf(pruned, folder, padded=True)`` writes a pruned model at the full shape instead, the
removed heads' weights zero (:func:`headlens.model.heads.padded_state`): ``transformers`` loads it
and computes the pruned model's outputs exactly; ``config.json`` records the kept heads as
``"headlens_padded_kept_heads"``, and ``headlens.load(folder)`` slices them back out.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from headlens.errors import HeadlensError
from headlens.io.families import FAMILIES
from headlens.io.families.base import convert_state_dict, invert_state_dict
from headlens.model.config import ModelConfig
from headlens.model.heads import padded_state
from headlens.model.transformer import HeadlensModel
from headlens.storage.folders import model_output, write_model_folder

# ModelConfig fields that describe the model rather than its computation
INFO_FIELDS = {"name", "source", "notes", "kept_heads", "sep_token_ids", "pad_token_id",
               "bos_token_id", "eos_token_id"}


def is_exportable(family) -> bool:
    """Whether a :class:`headlens.io.families.base.Family` can be written as a ``transformers`` folder
    (it has both ``config_to_hf`` and ``hf_layout``)."""
    return family.config_to_hf is not None and family.hf_layout is not None


def exportable_families() -> list[str]:
    return sorted(n for n, f in FAMILIES.items() if is_exportable(f))


def to_hf_state(model: HeadlensModel, padded: bool = False) -> tuple:
    """``(transformers config, state dict with transformers names)`` of ``model`` (``padded``: a
    pruned model at the unpruned shape, removed heads zero); checks that the state dict reads back
    into exactly the same tensors."""
    cfg = model.cfg
    family = FAMILIES.get(cfg.family)
    if family is None or not is_exportable(family):
        raise HeadlensError(f"model family {cfg.family!r} cannot be exported to a transformers folder; "
                            f"exportable families: {exportable_families()}")
    hf_config = family.config_to_hf(cfg)
    architecture, prefix = family.hf_layout(cfg)
    hf_config.architectures = [architecture]
    _check_expressible(family, cfg, hf_config)
    if padded and cfg.is_pruned:
        state, cfg = padded_state(model), cfg.replace(kept_heads=None)
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_state = {k: v.cpu().contiguous() for k, v in invert_state_dict(family, cfg, state, prefix).items()}
    back = convert_state_dict(family, cfg, hf_state)
    for k, v in state.items():
        if k not in back or not torch.equal(back[k].to(v.device), v):
            raise HeadlensError(f"the {family.name} weight rules do not invert {k!r}: export refused")
    return hf_config, hf_state


def save_hf(model: HeadlensModel, folder, padded: bool = False, overwrite: bool = False) -> Path:
    """Write ``model`` as a ``transformers`` checkpoint folder; returns the folder.

    Unpruned models load with ``transformers`` (``AutoModel*.from_pretrained(folder)``) and give
    the same outputs. Pruned models (``cfg.kept_heads``) get sliced attention weights and
    ``"headlens_kept_heads"`` in ``config.json``; only ``headlens.load(folder)`` reads those, since
    stock ``transformers`` 5.x cannot build layers with different head counts. With ``padded``
    they keep the full shape, removed heads zero: ``transformers`` reads that folder too and gives
    the pruned model's outputs (the file is as large as the unpruned model's).

    ``folder`` must be new or empty; ``overwrite=True`` replaces its contents. The folder the model
    was loaded from is always refused. Checked before anything is converted; the folder appears
    complete or not at all (:func:`headlens.storage.folders.write_model_folder`).
    """
    model_output(folder, overwrite, getattr(model, "loaded_from", None))
    hf_config, hf_state = to_hf_state(model, padded)
    hf_config.dtype = str(model.dtype).removeprefix("torch.")
    config = hf_config.to_dict()
    if model.cfg.kept_heads is not None:
        config["headlens_padded_kept_heads" if padded else "headlens_kept_heads"] = model.cfg.kept_heads

    def write(folder: Path) -> None:
        save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(folder))

    return write_model_folder(folder, write, overwrite, getattr(model, "loaded_from", None))


def _check_expressible(family, cfg: ModelConfig, hf_config) -> None:
    """Every computational field of ``cfg`` must survive the trip through ``hf_config``."""
    back = family.config_from_hf(hf_config)
    diffs = [f.name for f in dataclasses.fields(ModelConfig)
             if f.name not in INFO_FIELDS and getattr(back, f.name) != getattr(cfg, f.name)]
    if diffs:
        detail = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in diffs)
        raise HeadlensError(f"model cannot be written as a transformers {family.name} checkpoint: "
                            f"{detail} has no {family.name} equivalent")

"""A model larger than one device: its blocks placed over several devices.

A device map names, for a model's top-level modules (``W_E``, ``blocks.3``, ``ln_final``,
``unembed``, ...; ``""`` for the whole model), the device each lives on, as ``accelerate`` and
``transformers`` write it. :func:`resolve_device_map` makes one from

- ``"auto"``: accelerate's ``infer_auto_device_map`` under ``max_memory`` (``{0: "20GiB", 1:
  "20GiB", "cpu": "64GiB"}``; default: what the devices have free), never splitting a block;
- ``{layer: device}``: the blocks' devices (every layer must be given); the embeddings go with
  layer 0, the final norm and the output head with the last layer;
- ``{module name: device}``: used as it is (every top-level module must be covered).

:func:`place` moves the modules. The model's forward pass moves the activations into each block's
device (:class:`headlens.model.transformer.Block`) and returns its results on the input device.
Devices are ``torch.device`` strings; integers mean CUDA devices (``0`` is ``"cuda:0"``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from headlens.errors import HeadlensError, check

DeviceMap = dict[str, str]


def as_device(device: Union[int, str, torch.device]) -> str:
    """``0`` -> ``"cuda:0"``; ``"cpu"``, ``"cuda:1"`` ... unchanged; disk offload is refused."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device)
    check(text != "disk", "device_map: disk offload is not supported; give max_memory room for every block")
    try:
        torch.device(text)
    except (RuntimeError, TypeError):
        raise HeadlensError(f"device_map: {device!r} is not a torch device") from None
    return text


def _top_level(model: nn.Module, block_list: str) -> list[str]:
    """The modules a device map must cover: the blocks one by one, the other children whole
    (those with parameters or buffers)."""
    names = []
    for name, child in model.named_children():
        if name == block_list:
            names += [f"{name}.{i}" for i in range(len(child))]
        elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            names.append(name)
    return names


def resolve_device_map(model: nn.Module, device_map, max_memory: Optional[dict] = None,
                       block_list: str = "blocks", block_class: str = "Block", together=()) -> DeviceMap:
    """A complete ``{module name: device}`` map for ``model`` (see the module doc); the modules
    named in ``together`` (those the model has) all go where the first of them goes."""
    out = _resolve(model, device_map, max_memory, block_list, block_class)
    group = [name for name in together if name in out]
    for name in group[1:]:
        out[name] = out[group[0]]
    return out


def _resolve(model, device_map, max_memory, block_list: str, block_class: str) -> DeviceMap:
    names = _top_level(model, block_list)
    n_blocks = len(getattr(model, block_list))
    if isinstance(device_map, str):
        check(device_map == "auto", f"device_map must be 'auto', {{layer: device}} or {{module: device}}, "
                                    f"got {device_map!r}")
        try:
            from accelerate import infer_auto_device_map
        except ImportError:
            raise HeadlensError("device_map='auto' needs accelerate (pip install accelerate)") from None
        try:
            found = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[block_class])
        except ValueError as e:
            raise HeadlensError(f"device_map='auto' under max_memory={max_memory}: {e}") from None
        return _complete(model, {k: as_device(v) for k, v in found.items()}, names)
    check(isinstance(device_map, dict) and len(device_map) > 0,
          f"device_map must be 'auto', {{layer: device}} or {{module: device}}, got {type(device_map).__name__}")
    if all(str(k).lstrip("-").isdigit() for k in device_map):
        layers = {int(k): as_device(v) for k, v in device_map.items()}
        missing = sorted(set(range(n_blocks)) - set(layers))
        extra = sorted(set(layers) - set(range(n_blocks)))
        check(not missing and not extra, f"device_map {{layer: device}} must name every layer 0..{n_blocks - 1} "
                                         f"once (missing {missing}, out of range {extra})")
        out = {f"{block_list}.{i}": layers[i] for i in range(n_blocks)}
        blocks_at = names.index(f"{block_list}.0")
        for i, name in enumerate(names):
            if not name.startswith(f"{block_list}."):
                out[name] = layers[0] if i < blocks_at else layers[n_blocks - 1]
        return {name: out[name] for name in names}
    return _complete(model, {str(k): as_device(v) for k, v in device_map.items()}, names)


def _complete(model: nn.Module, given: DeviceMap, names: list[str]) -> DeviceMap:
    """Every top-level module's device from a map that may name a parent (``""``, ``blocks``) or
    a finer submodule (refused: a block stays on one device)."""
    out = {}
    for name in names:
        finer = [k for k in given if k.startswith(name + ".")]
        check(not finer, f"device_map splits {name!r} over devices ({finer[:2]}): a block stays on one device")
        owner = [k for k in given if k == "" or name == k or name.startswith(k + ".")]
        check(len(owner) > 0, f"device_map does not say where {name!r} goes")
        out[name] = given[max(owner, key=len)]
    known = {name for name, _ in model.named_modules()}
    unknown = [k for k in given if k not in known]
    check(not unknown, f"device_map names modules the model does not have: {unknown[:3]}")
    return out


def parse_device_map(text: Optional[str]):
    """``--device-map``: None, ``"auto"`` or a JSON object ``{layer or module: device}``."""
    if text is None or text == "auto":
        return text
    return _json_object(text, "--device-map")


def parse_max_memory(text: Optional[str]) -> Optional[dict]:
    """``--max-memory``: a JSON object ``{device: size}``; keys that are digits become GPU indices."""
    if text is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in _json_object(text, "--max-memory").items()}


def _json_object(text: str, flag: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise HeadlensError(f"{flag} must be 'auto' or a JSON object, got {text!r}") from None
    check(isinstance(value, dict) and value, f"{flag} must be a non-empty JSON object, got {text!r}")
    return value


def place(model: nn.Module, device_map: DeviceMap) -> nn.Module:
    """Move each module of ``device_map`` (a :func:`resolve_device_map` result) to its device."""
    for name, device in device_map.items():
        model.get_submodule(name).to(device)
    return model


def devices_of(model: nn.Module) -> list[str]:
    """The devices ``model``'s parameters live on, in the order they are first met."""
    seen = []
    for p in model.parameters():
        if str(p.device) not in seen:
            seen.append(str(p.device))
    return seen

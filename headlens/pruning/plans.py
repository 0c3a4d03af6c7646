"""The one pruning-plan format: which heads to remove, as ``prune_plan.json``.

Every command that writes a plan (``headlens report``, ``headlens prune``) writes this record,
atomically; :func:`headlens.pruning.physical.prune_heads` and ``headlens prune --apply`` read it::

    {
      "schema": "headlens.prune_plan", "version": 1,
      "heads": {"0": [3, 7], "4": [1]},          # the plan to apply: layer -> original head ids
      "recommended": "ablation",                 # which method's plan "heads" is (or null)
      "plans": {"michel": {...}, "ablation": {...}, "random": {...}},   # every method's plan
      "model": "minilm", "n_heads": 72, "task": "paraphrase", "metric": "...",
      "target": 0.5, "floor": null
    }

Only ``schema``, ``version`` and ``heads`` are required. A bare ``{layer: [heads]}`` mapping is
read as a plan too (what a user writes by hand).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from headlens.errors import HeadlensError, check
from headlens.files import atomic_write

PLAN_SCHEMA = "headlens.prune_plan"
PLAN_VERSION = 1
PLAN_FILE = "prune_plan.json"


def as_plan(heads) -> dict:
    """``[(layer, head), ...]`` -> ``{layer: sorted heads}``."""
    plan = {}
    for layer, head in sorted(heads):
        plan.setdefault(int(layer), []).append(int(head))
    return plan


def _heads_json(plan: dict) -> dict:
    """``{layer: heads}`` with string keys in layer order, empty layers dropped (JSON form)."""
    return {str(int(layer)): sorted(int(h) for h in heads)
            for layer, heads in sorted(plan.items(), key=lambda kv: int(kv[0])) if len(heads)}


def plan_record(heads: dict, plans: Optional[dict] = None, recommended: Optional[str] = None,
                **details) -> dict:
    """The ``prune_plan.json`` record of the plan ``heads`` (``{layer: [heads]}``); ``plans``: every
    method's plan, ``recommended``: the method ``heads`` comes from; ``details``: model, task,
    metric, target, floor ... (JSON values)."""
    record = {"schema": PLAN_SCHEMA, "version": PLAN_VERSION, "heads": _heads_json(heads),
              "recommended": recommended}
    if plans is not None:
        record["plans"] = {m: _heads_json(p) for m, p in plans.items()}
    record.update(details)
    return record


def write_plan(path, record: dict) -> Path:
    """Write a :func:`plan_record` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    read_plan(record)  # never write a record this module cannot read back
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_plan(source: Union[str, Path, dict]) -> dict:
    """The plan record in ``source`` (a ``prune_plan.json`` path or an already parsed dict); a bare
    ``{layer: [heads]}`` mapping becomes a record. Anything else: one-line :class:`HeadlensError`."""
    where = "plan"
    if isinstance(source, (str, Path)):
        where = f"plan file {str(source)!r}"
        path = Path(source)
        check(path.is_file(), f"{where} does not exist")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadlensError(f"{where} is not valid JSON: {e}") from None
    check(isinstance(source, dict), f"{where} must be a dict {{layer: [heads]}} or a prune_plan.json record, "
                                    f"got {type(source).__name__}")
    if "schema" not in source and "version" not in source:
        check("plan" not in source,
              f"{where} is in an old format ({{recommended, plan, plans}}); re-run the command that wrote it")
        return plan_record(_check_heads(source, where))
    check(source.get("schema") == PLAN_SCHEMA,
          f"{where}: schema must be {PLAN_SCHEMA!r}, got {source.get('schema')!r}")
    check(source.get("version") == PLAN_VERSION,
          f"{where}: version {source.get('version')!r} is not supported (this headlens reads version {PLAN_VERSION})")
    check("heads" in source, f"{where} has no 'heads' entry (the plan to apply)")
    record = dict(source)
    record["heads"] = _heads_json(_check_heads(source["heads"], f"{where}, heads"))
    for method, plan in (source.get("plans") or {}).items():
        _check_heads(plan, f"{where}, plans[{method!r}]")
    return record


def plan_heads(source) -> dict:
    """``{int layer: sorted [int heads]}`` of a plan record, a plan file or a bare mapping."""
    record = read_plan(source)
    return {int(layer): list(heads) for layer, heads in record["heads"].items()}


def _check_heads(heads, where: str) -> dict:
    """``{layer: [head, ...]}`` with integer-like layers and heads (merged when ``0`` and ``"0"``
    both appear); types only: heads are checked against a model by ``prune_heads``."""
    check(isinstance(heads, dict), f"{where} must map layer -> [head indices], got {type(heads).__name__}")
    merged: dict = {}
    for layer, hs in heads.items():
        check(str(layer).strip().isdigit(), f"{where}: layer {layer!r} is not a non-negative integer")
        check(isinstance(hs, (list, tuple, set, range)) or hasattr(hs, "tolist"),
              f"{where}[{layer!r}] must be a list of head indices, got {type(hs).__name__}")
        hs = hs.tolist() if hasattr(hs, "tolist") else list(hs)
        for h in hs:
            ok = (isinstance(h, int) and not isinstance(h, bool) and h >= 0) or (
                hasattr(h, "is_integer") and float(h).is_integer() and h >= 0)
            check(ok, f"{where}[{layer!r}]: head {h!r} is not a non-negative integer")
        merged.setdefault(int(layer), set()).update(int(h) for h in hs)
    return {layer: sorted(hs) for layer, hs in sorted(merged.items())}

"""KV plans: which key/value heads keep a full cache and which stream (sink + recent window),
and the one ``kv_plan.json`` format that hands the decision to the tools that apply it::

    {
      "schema": "headlens.kv_plan", "version": 1,
      "model": {"name": "smollm2", "family": "llama", "n_layers": 30, "n_heads": 9,
                "n_kv_heads": 3, "d_head": 64},
      "sink_size": 4, "recent_size": 64,
      "streaming": {"0": [1], "3": [0, 2]},     # per layer: the kv heads that stream
      "method": "headlens", "full_fraction": 0.5,
      "kv_heads": [[layer, kv_head, score], ...],  # every kv head; score 0 streams, 1 keeps it all
      "memory": {...}, "selection": {...}, "heldout": {...}
    }

Only ``schema``, ``version``, ``model``, ``sink_size``, ``recent_size`` and ``streaming`` are
required. kvpress' ``DuoAttentionPress`` takes it as ``(sink_size, recent_size, scores [L, K])``
(``kvpress_worker.py``).

Orders (which kv heads stream first): ``headlens`` (least streaming damage on the selection
split first), ``retrieval`` (lowest retrieval score first; ties: higher sink rate) and ``sink``
(highest sink rate first) as pattern-score baselines, ``random`` (one order per seed).

Memory (:func:`kv_memory`): a full kv head caches ``S`` positions, a streaming one
``min(S, sink + recent)``; each cached position holds a key and a value of ``d_head`` numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from headlens.errors import HeadlensError, check
from headlens.files import atomic_write

KV_PLAN_SCHEMA = "headlens.kv_plan"
KV_PLAN_VERSION = 1
KV_PLAN_FILE = "kv_plan.json"
ORDERS = ("headlens", "retrieval", "sink", "random")
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def order_kv_heads(table: pd.DataFrame, method: str, seed: int = 0) -> list[tuple[int, int]]:
    """The kv heads of ``table`` (``layer, kv_head, streaming_damage, sink_rate,
    retrieval_score``) in the order ``method`` streams them."""
    check(method in ORDERS, f"method must be one of {ORDERS}, got {method!r}")
    keys = list(zip(table["layer"].astype(int), table["kv_head"].astype(int)))
    if method == "random":
        return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    by = {"headlens": (["streaming_damage", "layer", "kv_head"], [True, True, True]),
          "retrieval": (["retrieval_score", "sink_rate", "layer", "kv_head"], [True, False, True, True]),
          "sink": (["sink_rate", "layer", "kv_head"], [False, True, True])}[method]
    ordered = table.sort_values(by[0], ascending=by[1], kind="stable")
    return list(zip(ordered["layer"].astype(int), ordered["kv_head"].astype(int)))


def n_streaming(n_kv: int, full_fraction: float) -> int:
    """How many of ``n_kv`` kv heads stream when ``full_fraction`` of them keep a full cache."""
    check(0 <= full_fraction <= 1, f"full_fraction must lie in [0, 1], got {full_fraction}")
    return int(round((1 - full_fraction) * n_kv))


def as_layers(heads) -> dict:
    """``[(layer, kv_head)]`` -> ``{layer: sorted kv heads}``."""
    out: dict = {}
    for layer, kv in sorted(heads):
        out.setdefault(int(layer), []).append(int(kv))
    return out


def kv_memory(cfg, length: int, streaming: dict, sink: int, recent: int, dtype: str = "float32",
              batch_size: int = 1) -> dict:
    """KV-cache bytes of the full model and of the plan at ``length`` tokens (per sequence times
    ``batch_size``), and the fraction saved."""
    check(dtype in BYTES, f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    per_position = 2 * cfg.d_head * BYTES[dtype] * batch_size  # a key and a value
    n_kv = sum(len(cfg.kv_heads_in_layer(layer)) for layer in range(cfg.n_layers))
    n_stream = sum(len(v) for v in streaming.values())
    full = n_kv * length * per_position
    plan = (n_kv - n_stream) * length * per_position + n_stream * min(length, sink + recent) * per_position
    return dict(length=int(length), dtype=dtype, batch_size=batch_size, kv_heads=n_kv, streaming_kv_heads=n_stream,
                full_bytes=int(full), plan_bytes=int(plan), saved_bytes=int(full - plan),
                saved_fraction=float(1 - plan / full) if full else 0.0)


def full_fraction_for_compression(compression: float, length: int, sink: int, recent: int) -> float:
    """The fraction of full-cache kv heads whose plan saves ``compression`` of the KV memory at
    ``length`` tokens (streaming heads keep ``sink + recent`` positions)."""
    per_head = 1 - min(length, sink + recent) / length
    check(per_head > 0, f"sink + recent ({sink + recent}) covers the whole length {length}: nothing to save")
    return float(np.clip(1 - compression / per_head, 0, 1))


def kv_plan_record(model, streaming: dict, sink: int, recent: int, method: str, table: Optional[pd.DataFrame] = None,
                   **details) -> dict:
    """The ``kv_plan.json`` record of ``streaming`` ``{layer: [kv heads]}`` (see the module doc)."""
    cfg = model.cfg
    stream = {(int(layer), int(kv)) for layer, kvs in streaming.items() for kv in kvs}
    every = [(layer, kv) for layer in range(cfg.n_layers) for kv in cfg.kv_heads_in_layer(layer)]
    record = {"schema": KV_PLAN_SCHEMA, "version": KV_PLAN_VERSION,
              "model": dict(name=cfg.name, family=cfg.family, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads, d_head=cfg.d_head),
              "sink_size": int(sink), "recent_size": int(recent),
              "streaming": {str(layer): kvs for layer, kvs in as_layers(stream).items()},
              "method": method,
              "kv_heads": [[layer, kv, 0.0 if (layer, kv) in stream else 1.0] for layer, kv in every]}
    record.update(details)
    return record


def write_kv_plan(path, record: dict) -> Path:
    """Write a :func:`kv_plan_record` atomically (checked by :func:`read_kv_plan` first)."""
    read_kv_plan(record)
    path = Path(path)
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_kv_plan(source) -> dict:
    """The record in ``source`` (a ``kv_plan.json`` path or a parsed dict); anything malformed
    raises a one-line :class:`HeadlensError`."""
    where = "kv plan"
    if isinstance(source, (str, Path)):
        where = f"kv plan file {str(source)!r}"
        check(Path(source).is_file(), f"{where} does not exist")
        try:
            source = json.loads(Path(source).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadlensError(f"{where} is not valid JSON: {e}") from None
    check(isinstance(source, dict), f"{where} must be a JSON object, got {type(source).__name__}")
    check(source.get("schema") == KV_PLAN_SCHEMA, f"{where}: schema must be {KV_PLAN_SCHEMA!r}, got {source.get('schema')!r}")
    check(source.get("version") == KV_PLAN_VERSION,
          f"{where}: version {source.get('version')!r} is not supported (this headlens reads {KV_PLAN_VERSION})")
    for key in ("model", "sink_size", "recent_size", "streaming"):
        check(key in source, f"{where} has no {key!r} entry")
    m = source["model"]
    check(isinstance(m, dict) and all(isinstance(m.get(k), int) and m[k] > 0 for k in ("n_layers", "n_kv_heads")),
          f"{where}: model must give n_layers and n_kv_heads as positive integers")
    for key in ("sink_size", "recent_size"):
        check(isinstance(source[key], int) and source[key] >= 0, f"{where}: {key} must be an integer >= 0")
    check(isinstance(source["streaming"], dict), f"{where}: streaming must map layer -> [kv heads]")
    for layer, kvs in source["streaming"].items():
        check(str(layer).isdigit() and int(layer) < m["n_layers"], f"{where}: layer {layer!r} is out of range")
        check(isinstance(kvs, list) and all(isinstance(k, int) and 0 <= k < m["n_kv_heads"] for k in kvs),
              f"{where}: streaming[{layer!r}] must list kv heads in [0, {m['n_kv_heads']})")
    return dict(source)


def streaming_of(record: dict) -> dict:
    """``{int layer: [kv heads]}`` of a plan record."""
    return {int(layer): list(kvs) for layer, kvs in read_kv_plan(record)["streaming"].items() if kvs}

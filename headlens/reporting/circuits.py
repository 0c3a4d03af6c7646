"""``headlens circuits``: every analysis of :mod:`headlens.circuits` on one model and task, written to
a folder atomically and resumably, and the same results as the "Circuits" section of
``headlens report --circuits``.

The analyses, in order: the metric on clean and corrupted inputs; direct logit attribution (contrast
tasks); activation patching of every head's z (all positions), which names the *key heads* (the
``top_heads`` whose patch moves the metric most, 95% CI excluding 0); patching of q, k, v and the
pattern (of every head on a model with at most ``path_heads`` heads, else of the key heads) and of
the first ``position_heads`` key heads' z per position; composition and copying scores; path
patching between heads (all of them, or the key heads) and into the logits; EAP-IG edge scores
and a circuit chosen on half of the examples and verified on the other half.

Folder: ``dla.csv`` (``layer, head, attribution, ci_low, ci_high, from_right, from_wrong``),
``dla_positions.csv``, ``dla_components.csv``, ``patching.csv``, ``patching_positions.csv``,
``path_patching.csv``, ``composition.csv``, ``copying.csv``, ``edges.csv`` (every edge's score),
``faithfulness.csv`` (the curve), ``verification.csv`` (estimate, stated and verified
faithfulness side by side), ``circuit.json`` (the circuit, how it was chosen, its stated and
verified faithfulness and the estimate), ``circuits.md``, ``figures/`` and ``run.json``. Until a run
is complete the folder has no ``circuit.json`` (it is moved in last); re-running the same command
resumes from the analyses an interrupted run finished.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from headlens.circuits.dla import LogitAttribution
from headlens.circuits.faithfulness import Circuit, extract_circuit
from headlens.circuits.patching import activation_patching
from headlens.circuits.paths import path_patching
from headlens.circuits.runs import check_additive, circuit_batches, metric_gap
from headlens.circuits.summary import findings, key_heads
from headlens.circuits.weights import composition_scores, copying_scores
from headlens.errors import HeadlensError, check
from headlens.importance.tasks import ContrastTask
from headlens.model.heads import head_label
from headlens.reporting.folder import ReportFolder, register_result_class, write_json, write_table
from headlens.reporting.render import markdown_table
from headlens.reporting.run_record import PACKAGES, model_key, package_version, task_key

CIRCUIT_FILE = "circuit.json"
DEFAULTS = dict(batch_size=8, n_bootstrap=1000, seed=0, activations=("z", "q", "k", "v", "pattern"),
                direction="denoise", top_heads=12, position_heads=6, path_heads=64, method="eap-ig", steps=5,
                target=0.8, n_edges=None, split=0.5,
                n_baseline=500)
TABLES = {"dla": "dla.csv", "dla_positions": "dla_positions.csv", "dla_components": "dla_components.csv",
          "patching": "patching.csv", "patching_positions": "patching_positions.csv", "paths": "path_patching.csv",
          "composition": "composition.csv", "copying": "copying.csv", "edges": "edges.csv",
          "curve": "faithfulness.csv"}

for _cls in (LogitAttribution, Circuit):  # in the stages' results, saved for resume
    register_result_class(_cls)


def check_applicable(model, task) -> None:
    """Fail before any work when the circuit analyses cannot run on ``model`` and ``task``."""
    check_additive(model, "circuit analysis")
    check(model.cfg.causal, f"circuit analyses run on decoders; {model.cfg.name!r} is an encoder")
    circuit_batches(model, task, 1, "circuit analysis")


def analyse(model, task, config: Optional[dict] = None, stage: Optional[Callable] = None,
            progress: bool = False) -> dict:
    """Every circuit analysis of ``model`` on ``task`` (see the module doc); ``config`` overrides
    :data:`DEFAULTS`; ``stage(name, compute)`` may cache each analysis (resume)."""
    c = dict(DEFAULTS, **(config or {}))
    stage = stage or (lambda name, compute: compute())
    check_applicable(model, task)
    bs, nb, seed = c["batch_size"], c["n_bootstrap"], c["seed"]
    res = dict(config=c, model=dict(name=model.cfg.name, family=model.cfg.family, n_layers=model.cfg.n_layers,
                                    n_heads=model.cfg.n_heads, n_kv_heads=model.cfg.n_kv_heads,
                                    n_heads_total=model.cfg.n_heads_total))
    res["task"] = stage("gap", lambda: metric_gap(model, task, bs, nb, seed))
    if isinstance(task, ContrastTask):
        dla = stage("dla", lambda: LogitAttribution(bs, nb, seed).fit(model, task))
        res.update(dla=dla.heads_, dla_positions=dla.positions_, dla_components=dla.components_,
                   dla_error=dla.reconstruction_error_)
    small = model.cfg.n_heads_total <= c["path_heads"]
    first = ("z",) if "z" in c["activations"] or not small else tuple(c["activations"])
    runs = dict(direction=c["direction"], batch_size=bs, n_bootstrap=nb, seed=seed, progress=progress)
    patching = stage("patching", lambda: activation_patching(model, task, first, **runs))
    key = key_heads(patching, c["top_heads"])
    rest = tuple(a for a in c["activations"] if a not in first)
    if rest and (small or key):
        more = stage("patching_inputs", lambda: activation_patching(
            model, task, rest, heads=None if small else key, **runs))
        patching = pd.concat([patching, more], ignore_index=True).sort_values(
            ["activation", "layer", "head", "position"], ignore_index=True)
    res["patching"] = patching
    if key and c["position_heads"] > 0:
        res["patching_positions"] = stage("patching_positions", lambda: activation_patching(
            model, task, ("z",), by_position=True, heads=key[:c["position_heads"]], **runs))
    res["composition"] = stage("composition", lambda: composition_scores(model, c["n_baseline"], seed))
    res["copying"] = stage("copying", lambda: copying_scores(model))
    heads = None if model.cfg.n_heads_total <= c["path_heads"] else sorted(key)
    res["path_heads"] = "all" if heads is None else [head_label(a, b) for a, b in heads]
    if heads is None or heads:
        res["paths"] = stage("paths", lambda: path_patching(model, task, senders=heads, receivers=heads,
                                                            batch_size=bs, n_bootstrap=nb, seed=seed,
                                                            progress=progress))
    circuit = stage("circuit", lambda: extract_circuit(
        model, task, c["method"], c["steps"], c["n_edges"], c["target"] if c["n_edges"] is None else None,
        c["split"], bs, nb, seed, progress=progress))
    res.update(edges=circuit.scores, curve=circuit.curve, circuit=circuit.to_dict())
    res["findings"] = findings(model.cfg.n_layers, res["task"], res["patching"], res["composition"],
                               res.get("paths"), res["circuit"], res.get("dla"))
    return res


# --- writing ------------------------------------------------------------------------------------
def write_results(res: dict, folder: Path, prefix: str = "") -> dict:
    """The tables, ``circuit.json`` and figures of ``res`` into ``folder``; returns
    ``{figure name: (png path relative to folder, title, caption)}``."""
    from headlens.reporting.figures import circuits as fc

    folder.mkdir(parents=True, exist_ok=True)
    for key, name in TABLES.items():
        if res.get(key) is not None:
            write_table(res[key], folder / name)
    figures, fig_dir = {}, folder / "figures"
    circuit = res["circuit"]
    edges = pd.DataFrame(circuit["edges"], columns=["sender", "receiver", "via", "score", "rank"])
    ends = edges.assign(receiver_layer=[_layer(r, res["model"]["n_layers"]) for r in edges.receiver])
    group = res["model"]["n_heads"] // res["model"].get("n_kv_heads", res["model"]["n_heads"])
    paths = fc.circuit_graph(ends, str(fig_dir / "circuit_graph"), res["model"]["n_layers"], group=group,
                             title=f"{circuit['method'].upper()} circuit: {circuit['n_edges']} edges, verified "
                                   f"faithfulness {circuit['verified']['faithfulness']:.2f}")
    figures["circuit_graph"] = (paths[0], "Circuit graph",
                                "Edges of the extracted circuit (colour: the receiver's input; width: |edge score|).")
    paths = fc.faithfulness_plot(res["curve"], str(fig_dir / "faithfulness"), circuit.get("target"))
    figures["faithfulness"] = (paths[0], "Faithfulness curve",
                               "Exact faithfulness on held-out examples (95% CI band) and the edge scores' linear "
                               "estimate, against the number of top edges kept.")
    if len(res["composition"]):
        paths = fc.composition_heatmaps(res["composition"], str(fig_dir / "composition"))
        figures["composition"] = (paths[0], "Composition scores",
                                  "Q-, K- and V-composition of every sender into every later receiver "
                                  "(* above the random baseline's 95th percentile).")
    z = res["patching"]
    z = z[(z.activation == "z") & (z.position == -1)]
    paths = fc.head_heatmap(z, "normalized", str(fig_dir / "patching"), "Activation patching of each head's z",
                            "fraction of the gap restored")
    figures["patching"] = (paths[0], "Activation patching", "Clean z of one head patched into the corrupted run: "
                           "(metric - corrupted) / (clean - corrupted).")
    if res.get("dla") is not None:
        paths = fc.head_heatmap(res["dla"], "attribution", str(fig_dir / "dla"), "Direct logit attribution",
                                "logit difference")
        figures["dla"] = (paths[0], "Direct logit attribution",
                          "Each head's direct contribution to the logit difference (final norm frozen).")
    write_table(verification_table(circuit), folder / "verification.csv")
    write_json(folder / CIRCUIT_FILE, dict(circuit, findings=res["findings"], task=res["task"], model=res["model"],
                                           path_heads=res["path_heads"], dla_reconstruction_error=res.get("dla_error")))
    return {f"{prefix}{k}": (Path(p).relative_to(folder).as_posix(), t, cap) for k, (p, t, cap) in figures.items()}


def _layer(receiver: str, n_layers: int) -> int:
    base = receiver.split("<")[0]
    if base == "logits":
        return n_layers
    return int(base[3:]) if base.startswith("mlp") else int(base.split(".")[0])


def verification_table(circuit: dict) -> pd.DataFrame:
    """The circuit's faithfulness three ways: the edge scores' estimate, exact on the examples it was
    chosen on (stated), exact on held-out examples (verified)."""
    s, v = circuit["stated"], circuit["verified"]
    return pd.DataFrame([
        dict(measure="estimate (edge scores, linear)", faithfulness=circuit["estimated"], ci_low=np.nan,
             ci_high=np.nan, n_examples=s["n_examples"]),
        dict(measure="stated (exact, selection examples)", **{k: s[k] for k in ("faithfulness", "ci_low", "ci_high",
                                                                                 "n_examples")}),
        dict(measure="verified (exact, held-out examples)", **{k: v[k] for k in ("faithfulness", "ci_low", "ci_high",
                                                                                  "n_examples")})])


def section(res: dict, figures: dict, folder: str = "circuits") -> dict:
    """The "Circuits" section of a report (the format of :meth:`Report.add_section`) whose files
    :func:`write_results` wrote under ``folder/``."""
    tables = [dict(title="Circuit faithfulness: estimate, stated and verified", file=f"{folder}/verification.csv",
                   text_columns=["measure"]),
              dict(title="Faithfulness curve", file=f"{folder}/faithfulness.csv", text_columns=[])]
    tables.append(dict(title="Direct logit attribution", file=f"{folder}/dla.csv", text_columns=[]))
    if res.get("paths") is not None:
        tables.append(dict(title="Path patching", file=f"{folder}/path_patching.csv", text_columns=["via"]))
    if len(res["composition"]):
        tables.append(dict(title="Composition scores", file=f"{folder}/composition.csv", text_columns=["via"]))
    tables = [t for t in tables if t["title"] != "Direct logit attribution" or res.get("dla") is not None]
    return dict(id="circuits", title="Circuits", paragraphs=[
        "Which heads feed which: activation patching (clean into corrupted), path patching (Wang et al. 2022) "
        "through each head's query, key and value input, composition scores on the weights (Elhage et al. 2021) "
        "against random matrices of the same shapes, and an EAP-IG circuit (Hanna et al. 2024) chosen on half of "
        "the examples and verified by exact edge patching on the other half."],
        notes=list(res["findings"]), tables=tables,
        figures=[dict(name=f"circuits_{k}", title=t, caption=cap, path=f"{folder}/{p}")
                 for k, (p, t, cap) in figures.items()])


def markdown(res: dict, command: str) -> str:
    lines = [f"# Circuits of {res['model']['name']} on {res['task']['name']}", "", f"`{command}`", "",
             "## Findings", ""]
    lines += [f"- {f}" for f in res["findings"]]
    lines += ["", "## Circuit faithfulness", "", markdown_table(verification_table(res["circuit"])), ""]
    lines += ["## Files", ""] + [f"- `{name}`" for name in TABLES.values()] + [f"- `{CIRCUIT_FILE}`", "- `figures/`"]
    return "\n".join(lines) + "\n"


# --- the command --------------------------------------------------------------------------------
class CircuitsFolder(ReportFolder):
    """A report folder whose completeness is ``run.json`` then ``circuit.json``."""

    last = ("run.json", CIRCUIT_FILE)
    by = "circuits"


def circuits(model, task, out, config: Optional[dict] = None, resume: bool = True, force: bool = False,
             progress: bool = True, command: Optional[str] = None) -> dict:
    """Run :func:`analyse` and write the folder ``out`` (see the module doc); returns the results."""
    c = dict(DEFAULTS, **(config or {}))
    check_applicable(model, task)
    key = dict({k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}, model=model_key(model),
               task=task_key(task))
    folder = CircuitsFolder(out, key, resume=resume, force=force)
    start = time.perf_counter()
    try:
        res = analyse(model, task, c, folder.stage, progress)
        write_results(res, folder.staging)
        (folder.staging / "circuits.md").write_text(markdown(res, command or "headlens.reporting.circuits.circuits"))
        write_json(folder.staging / "run.json", dict(
            status="complete", command=command, config=key, model=res["model"], task=res["task"],
            resumed_stages=folder.resumed, stage_seconds=folder.seconds,
            timings_s=dict(this_attempt=round(time.perf_counter() - start, 3), **folder.elapsed()),
            versions={p: package_version(p) for p in PACKAGES},
            platform=dict(system=platform.platform(), python=sys.version.split()[0],
                          torch_threads=torch.get_num_threads())))
    except BaseException:
        folder.abandon()
        raise
    folder.publish()
    return res


def load_results(folder) -> dict:
    """``circuit.json`` of a finished circuits folder."""
    path = Path(folder) / CIRCUIT_FILE
    if not path.is_file() or not (Path(folder) / "run.json").is_file():
        raise HeadlensError(f"{str(folder)!r} holds no complete circuits run (circuit.json missing)")
    return json.loads(path.read_text())


# --- the section of ``headlens report --circuits`` ---------------------------------------------------
def report_stage(model, task, folder: ReportFolder, config: dict, progress: bool = False) -> dict:
    """:func:`analyse` inside a report: the report's batch size, bootstrap and seed, each analysis
    saved in the report's resume state."""
    return analyse(model, task, dict(batch_size=config["batch_size"], n_bootstrap=config["n_bootstrap"],
                                     seed=config["seed"]),
                   stage=lambda name, compute: folder.stage(f"circuits_{name}", compute), progress=progress)


def add_section(res: dict, run: dict, staging: Path, folder: str = "circuits") -> None:
    """Write ``res`` under ``staging/folder`` and add its section to the report's ``run``."""
    figures = write_results(res, Path(staging) / folder)
    run["sections"] = [s for s in run.get("sections", []) if s["id"] != "circuits"] + [section(res, figures, folder)]
    files = run.setdefault("files", [])
    if f"{folder}/" not in files:
        files.insert(max(len(files) - 3, 0), f"{folder}/")  # before report.md, run.json, report.html

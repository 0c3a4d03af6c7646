"""Repeatable: the same call with the same seed gives the same numbers, and ``run.json`` records
everything needed to repeat a report.

- every seeded analysis gives identical tables for the same seed even when the global torch /
  numpy / Python generators were reseeded in between (it draws only from its own generators), and
  different tables for another seed (so the seed really reaches it);
- ``report()`` records every parameter that changes its results in ``run.json``'s ``config``;
- the command line ``headlens report`` records in ``run.json`` re-parses to exactly the same call.

Byte-identical ``heads.csv`` / ``clusters.csv`` / ``pruning.csv`` from two runs of the same
command: in one process in ``test_report.py``, across processes with different hash seeds (the
second run being the command taken from ``run.json``) in
``test_resume.py::test_report_killed_inside_the_sweep_resumes_to_the_tables_of_an_uninterrupted_run``.
"""
import importlib
import inspect
import random
import shlex

import numpy as np
import pandas as pd
import pytest
import torch

from headlens.importance.gradients import attribution_patching, gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.patterns.clusters import HeadClusterer
from headlens.patterns.scores import pattern_scores
from headlens.pruning.curve import pruning_curve

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "it rains", "we walked to the old bridge and back", "one two three", "the end is near",
         "she sells sea shells"]


def _clusters(model, seed):
    fit = HeadClusterer(n_clusters=3, n_bootstrap=4, seed=seed, batch_size=4).fit(model, TEXTS)
    embedding = pd.DataFrame(fit.embedding_, columns=["x", "y"])
    return pd.concat([fit.labels_, embedding], axis=1), pd.DataFrame({"ari": fit.stability_["ari"]})


def _pruning(model, seed):
    result = pruning_curve(model, LMLossTask(TEXTS), methods=("random", "ablation"), n_random=2, step=0.25,
                           seed=seed, batch_size=4, progress=False)
    return result.curve, pd.DataFrame(sorted((k, tuple(v)) for k, v in result.plan.items()))


# name -> (seed -> tables, the columns a different seed must change)
SEEDED = {
    "ablation_sweep resample + bootstrap": (
        lambda m, s: ablation_sweep(m, LMLossTask(TEXTS), "resample", seed=s, n_bootstrap=200, batch_size=4,
                                    progress=False),
        ["importance", "importance_ci_low"]),
    "attribution_patching resample": (
        lambda m, s: attribution_patching(m, LMLossTask(TEXTS), "resample", seed=s, batch_size=4),
        ["attribution"]),
    "pattern_scores probe": (
        lambda m, s: pattern_scores(m, TEXTS, batch_size=4, seed=s, n_probe=4, probe_len=6),
        ["score_induction"]),
    "HeadClusterer": (_clusters, ["x", "ari"]),
    "pruning_curve": (_pruning, ["metric", "n_pruned"]),
    "gradient_importance (no seed)": (
        lambda m, s: gradient_importance(m, LMLossTask(TEXTS), batch_size=4), []),
}


def tables(result) -> list:
    return list(result) if isinstance(result, tuple) else [result]


def scramble_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("name", list(SEEDED))
def test_same_seed_same_tables_other_seed_other_tables(tiny_gpt2, name):
    run, seeded_columns = SEEDED[name]
    scramble_global_generators(1)
    first = tables(run(tiny_gpt2, 0))
    scramble_global_generators(2)
    again = tables(run(tiny_gpt2, 0))
    for a, b in zip(first, again):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert a.to_csv().encode() == b.to_csv().encode()
    if seeded_columns:
        other = pd.concat(tables(run(tiny_gpt2, 1)), axis=1)
        base = pd.concat(first, axis=1)
        changed = [c for c in seeded_columns if not np.array_equal(base[c].to_numpy(), other[c].to_numpy())]
        assert changed, f"seed 1 gave the same {seeded_columns} as seed 0: the seed does not reach them"


# --- what run.json records ------------------------------------------------------------------
# where and how, not what (a device map places the same computation, as the thread count does)
NOT_RESULTS = {"out", "progress", "resume", "force", "keep_resume", "command", "device_map", "max_memory"}


class Captured(Exception):
    pass


def test_report_config_records_every_parameter_that_changes_results(monkeypatch, tmp_path):
    """``report()``'s configuration (written to run.json and fingerprinting its checkpoints) holds
    every parameter except the ones that only say where and how to run."""
    report_module = importlib.import_module("headlens.reporting.pipeline")
    seen = {}

    def capture(out, config, **kwargs):
        seen.update(config)
        raise Captured

    monkeypatch.setattr(report_module, "ReportFolder", capture)
    values = dict(model="some-folder", task="lm", ablation="mean", metric="lm", batch_size=3, device="cpu",
                  dtype="bfloat16", seed=7, n_examples=5, prune_target=0.3, prune_floor=0.8, n_bootstrap=11,
                  n_clusters=4, data=["one text", "another text"], circuits=True, long_context=512, truncate=True)
    params = set(inspect.signature(report_module.report).parameters) - NOT_RESULTS
    assert params <= set(values), f"a new report() parameter is not covered here: {params - set(values)}"
    with pytest.raises(Captured):
        report_module.report(out=tmp_path / "r", **values)
    missing = params - set(seen)
    assert not missing, f"run.json's config does not record {missing}"
    for name in params - {"data"}:
        assert seen[name] == values[name], name
    assert seen["data"] is not None  # texts are recorded by a key (hash)
    with pytest.raises(Captured):
        report_module.report(out=tmp_path / "r", **dict(values, data=["other texts"]))
    assert seen["data"] != values["data"]


def test_recorded_command_reparses_to_the_same_call(monkeypatch):
    """The command line that ``headlens report`` writes to run.json, parsed again, makes exactly
    the same ``report()`` call (every result-changing option survives the round trip)."""
    from headlens.cli import build_parser

    report_module = importlib.import_module("headlens.reporting.pipeline")
    params = set(inspect.signature(report_module.report).parameters) - NOT_RESULTS - {"data"}
    calls = []

    class Done:
        html = "report.html"

        def summary(self):
            return ""

    def fake_report(**kwargs):
        calls.append(kwargs)
        return Done()

    monkeypatch.setattr(report_module, "report", fake_report)
    argv = ["report", "--model", "my model/folder", "--task", "ioi", "--ablation", "resample", "--metric",
            "accuracy", "--batch-size", "3", "--device", "cpu", "--dtype", "bfloat16", "--seed", "7",
            "--n-examples", "5", "--prune-target", "0.3", "--prune-floor", "0.8", "--n-bootstrap", "11",
            "--n-clusters", "4", "--long-context", "512", "--device-map", '{"0": "cpu"}', "--max-memory",
            '{"cpu": "1GiB"}', "--out", "out dir", "--no-progress", "--quiet"]
    args = build_parser().parse_args(argv)
    args._run(args)
    command = calls[0]["command"]
    assert command.startswith("headlens report ")
    again = build_parser().parse_args(shlex.split(command)[1:] + ["--no-progress", "--quiet"])
    again._run(again)
    first, second = calls
    assert first == second
    assert params <= set(first)
    assert (first["seed"], first["ablation"], first["n_clusters"], first["prune_floor"]) == (7, "resample", 4, 0.8)

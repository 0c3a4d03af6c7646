"""Pruning curves: plans chosen on one split and scored on the other, three methods, floors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from headlens import HeadlensModel, ModelConfig
from headlens.errors import HeadlensError
from headlens.importance.gradients import gradient_importance
from headlens.importance.statistics import importance_table
from headlens.importance.sweep import ablation_sweep, sweep_metrics
from headlens.importance.tasks import FidelityTask, LMLossTask
from headlens.model.heads import gate_without
from headlens.pruning.curve import michel_order, pruning_curve, selection_split

V = 40


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(n_layers=3, d_model=24, n_heads=4, d_head=8, n_ctx=16, vocab_size=V, d_mlp=48)
    return HeadlensModel(cfg).init_weights(seed=4, std=0.2).eval()


@pytest.fixture(scope="module")
def task():
    gen = torch.Generator().manual_seed(0)
    return LMLossTask([torch.randint(0, V, (10,), generator=gen).tolist() for _ in range(24)])


@pytest.fixture(scope="module")
def result(model, task):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = pruning_curve(model, task, target=0.5, step=0.25, n_random=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    return out


def test_curve_layout(result, model):
    curve = result.curve
    assert list(curve.columns[:4]) == ["method", "seed", "n_pruned", "fraction_pruned"]
    assert {"metric", "metric_selection", "relative", "within_floor"} <= set(curve.columns)
    assert set(curve["method"]) == {"michel", "ablation", "random"}
    assert sorted(curve[curve.method == "random"]["seed"].unique().tolist()) == [0, 1]
    for _, part in curve.groupby(["method", "seed"], dropna=False):
        assert part["n_pruned"].tolist() == [0, 3, 6]
    assert curve[curve.n_pruned == 0]["metric"].nunique() == 1  # the same unpruned model everywhere
    assert curve.attrs["n_selection"] + curve.attrs["n_heldout"] == 24
    assert (curve.ci_low <= curve.metric + 1e-12).all() and (curve.metric <= curve.ci_high + 1e-12).all()
    assert curve[curve.method == "random"].p_vs_random.isna().all()
    assert curve[(curve.method != "random") & (curve.n_pruned > 0)].p_vs_random.between(0, 1).all()
    for method, r in result.stats["methods"].items():
        assert r["n_low"] <= r["n_pruned"] <= r["n_high"], method


def test_plans_and_scores_are_consistent(result, model, task):
    select, held = task.split(0.5, 0)
    assert result.recommended in ("michel", "ablation") and result.plan == result.plans[result.recommended]
    for method, plan in result.plans.items():
        heads = [(layer, h) for layer, hs in plan.items() for h in hs]
        assert len(heads) == 6 and all(isinstance(layer, int) for layer in plan)
        expect = held.evaluate(model, head_gate=gate_without(model, heads)).mean()
        row = result.curve[(result.curve.method == method) & (result.curve.n_pruned == 6)]
        row = row[row.seed.isna()] if method != "random" else row[row.seed == 0]
        assert row["metric"].item() == pytest.approx(expect)
    json.dumps(result.plans)  # plain ints and lists
    curve, plan = result  # tuple-style unpacking
    assert plan == result.plan


def test_orders_follow_their_methods(result, model, task):
    select, _ = task.split(0.5, 0)
    sweep = ablation_sweep(model, select, n_bootstrap=0, progress=False)
    least = sweep.sort_values(["damage", "layer", "head"]).head(6)
    assert result.orders["ablation"][:6] == list(zip(least["layer"], least["head"]))
    first = gradient_importance(model, select).sort_values(["grad_importance", "layer", "head"]).head(3)
    assert result.orders["michel"][:3] == list(zip(first["layer"], first["head"]))
    assert michel_order(model, select, 6, 3) == result.orders["michel"]


def test_michel_progress_goes_through_tqdm(model, task, capsys):
    """Progress never prints to stdout (it would break tqdm bars and piped output); silent when off."""
    quiet = michel_order(model, task, 2, 1, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert michel_order(model, task, 2, 1, progress=True) == quiet
    out = capsys.readouterr()
    assert out.out == "" and "michel order" in out.err


def test_a_full_task_sweep_restricted_to_the_selection_split_gives_the_same_curve(model, task):
    """selection_split is pruning_curve's split, and its positions pick the selection examples out
    of a sweep of the whole task: the same metrics as sweeping the split itself (zero ablation),
    hence the same ablation order and curve, also when the task's ids are not its positions."""
    shuffled = task.subset(np.random.default_rng(1).permutation(len(task))[:20])
    select, held, rows = selection_split(shuffled, 0.5, 3)
    assert select.ids == shuffled.split(0.5, 3)[0].ids and sorted(select.ids + held.ids) == sorted(shuffled.ids)
    assert [shuffled.ids[r] for r in rows] == select.ids and rows.tolist() != select.ids
    heads, clean, ablated = sweep_metrics(model, shuffled, progress=False)
    _, clean_select, ablated_select = sweep_metrics(model, select, progress=False)
    np.testing.assert_allclose(clean[rows], clean_select, rtol=1e-5)
    for h in heads:
        np.testing.assert_allclose(ablated[h][rows], ablated_select[h], rtol=1e-5)
    sweep = importance_table(heads, clean[rows], {h: v[rows] for h, v in ablated.items()}, select, n_bootstrap=0)
    kwargs = dict(methods=("ablation",), target=0.5, step=0.25, seed=3, progress=False)
    reused, fresh = pruning_curve(model, shuffled, sweep=sweep, **kwargs), pruning_curve(model, shuffled, **kwargs)
    assert reused.orders == fresh.orders
    pd.testing.assert_frame_equal(reused.curve, fresh.curve)


def test_floor_stops_early(model, task):
    faithful = FidelityTask(task.texts, measure="cosine")  # every removal moves the embeddings
    kwargs = dict(methods=("ablation",), target=1.0, step=0.25, progress=False)
    strict = pruning_curve(model, faithful, floor=0.99, **kwargs)
    loose = pruning_curve(model, faithful, floor=0.01, **kwargs)
    n_strict = sum(len(v) for v in strict.plan.values())
    assert n_strict < sum(len(v) for v in loose.plan.values()) == 12
    assert not strict.curve["within_floor"].all()
    part = strict.curve.sort_values("n_pruned")
    ok = part["within_floor"].to_numpy()
    assert ok[0] and (ok.all() or n_strict == part["n_pruned"].to_numpy()[np.argmin(ok) - 1])


def test_bad_input(model, task):
    with pytest.raises(HeadlensError, match="methods"):
        pruning_curve(model, task, methods=("magnitude",), progress=False)
    with pytest.raises(HeadlensError, match="target"):
        pruning_curve(model, task, target=1.5, progress=False)
    with pytest.raises(HeadlensError, match="floor"):
        pruning_curve(model, task, floor=2, progress=False)
    with pytest.raises(HeadlensError, match="empty"):
        pruning_curve(model, LMLossTask([]), progress=False)


def test_prune_command(tiny_gpt2, tmp_path, capsys):
    import headlens
    from headlens.cli import main
    from headlens.io.native import save_model

    save_model(tiny_gpt2, tmp_path / "model")
    out, saved = tmp_path / "out", tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "model"), "--task", "ioi", "--n-examples", "12", "--step", "0.25",
                 "--n-random", "1", "--no-progress", "--out", str(out), "--save-model", str(saved)]) == 0
    record = json.loads((out / "prune_plan.json").read_text())
    assert record["schema"] == "headlens.prune_plan" and record["version"] == 1
    assert record["recommended"] in ("michel", "ablation") and (out / "pruning.csv").is_file()
    assert record["heads"] == record["plans"][record["recommended"]]
    pruned = headlens.load(saved)
    assert pruned.cfg.n_heads_total == 12 - sum(len(v) for v in record["heads"].values())
    assert "speed-up" in capsys.readouterr().out
    # --apply reads the same file and removes the same heads, without an analysis
    again = tmp_path / "again"
    assert main(["prune", "--model", str(tmp_path / "model"), "--task", "ioi", "--n-examples", "4", "--no-progress",
                 "--apply", str(out / "prune_plan.json"), "--save-model", str(again)]) == 0
    assert headlens.load(again).cfg.kept_heads == pruned.cfg.kept_heads
    (tmp_path / "bad.json").write_text('{"schema": "headlens.prune_plan", "version": 1, "heads": {"0": ["x"]}}')
    assert main(["prune", "--model", str(tmp_path / "model"), "--apply", str(tmp_path / "bad.json"),
                 "--save-model", str(tmp_path / "never")]) == 2
    assert "head 'x' is not a non-negative integer" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

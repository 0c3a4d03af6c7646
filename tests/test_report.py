"""headlens report: the output folder (atomic, resumable, deterministic), the rendered pages and
the pipeline end to end on a tiny random GPT-2 (the CLI has its own tests in test_cli.py)."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headlens import render
from headlens.errors import HeadlensError
from headlens.outdir import ReportFolder, is_complete, write_table
from headlens.report import Report, _write


def fake_report(out: Path, n_layers: int = 3, n_heads: int = 4) -> Report:
    """A report of made-up numbers written through the real writer (for rendering tests)."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            imp = float(rng.normal(0.05, 0.05))
            rows.append(dict(layer=layer, head=head, role=["previous-token", "first-token sink", "broad"][head % 3],
                             pattern_class="vertical", cluster=head % 2, importance=imp, importance_se=0.01,
                             importance_ci_low=imp - 0.02, importance_ci_high=imp + 0.02,
                             grad_importance=abs(imp), score_previous_token=rng.random()))
    heads = pd.DataFrame(rows)
    heads.loc[0, ["importance", "importance_ci_low", "importance_ci_high"]] = [0.5, 0.4, 0.6]
    clusters = pd.DataFrame(dict(cluster=[0, 1], size=[6, 6], members=["0.0 0.2", "0.1 0.3"],
                                 description=["attend to the previous token", "attend to [CLS]"]))
    pruning = pd.DataFrame(dict(method=["michel"] * 3, n_pruned=[0, 3, 6], metric=[1.0, 0.95, 0.7]))
    folder = ReportFolder(out, {"fake": 1})
    figures = {}
    for name in ["importance", "score_previous_token", "distance", "pruning_curve"]:
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1], [0, 1])
        fig.savefig(folder.staging / "figures" / f"{name}.png")
        plt.close(fig)
        figures[name] = out / "figures" / f"{name}.png"
    run = dict(status="complete", command="headlens report --model fake",
               config=dict(seed=0, ablation="zero", n_bootstrap=100, device="cpu", dtype="float32"),
               model=dict(name="fake <b>model</b>", family="gpt2", causal=True, n_layers=n_layers,
                          n_heads=n_heads, n_heads_total=n_layers * n_heads, n_params=1e6),
               data=dict(task="lm", task_examples=10, metric="lm_loss", higher_is_better=False),
               results=dict(cluster_stability_ari=0.8), figures={k: f"figures/{k}.png" for k in figures},
               files=["heads.csv"], timings_s=dict(total=1.0), versions=dict(headlens="0"))
    rep = Report(out, heads, clusters, pruning, {"heads": {"0": [1]}}, figures, run)
    _write(rep, folder)
    folder.publish()
    return rep


# --- the output folder ---------------------------------------------------------------------
def test_out_that_is_a_file_or_foreign_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(HeadlensError, match="is a file"):
        ReportFolder(tmp_path / "f", {})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(HeadlensError, match="not empty"):
        ReportFolder(tmp_path / "mine", {})
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_stage_checkpoints_resume_and_refuse_other_configuration(tmp_path):
    calls = []
    folder = ReportFolder(tmp_path / "r", {"seed": 0})
    assert folder.stage("a", lambda: calls.append(1) or 41) == 41
    folder.abandon()  # the run dies here
    folder = ReportFolder(tmp_path / "r", {"seed": 0})
    assert folder.stage("a", lambda: calls.append(1) or 99) == 41 and calls == [1]
    assert folder.resumed == ["a"]
    with pytest.raises(HeadlensError, match="another configuration"):
        ReportFolder(tmp_path / "r", {"seed": 1})
    folder = ReportFolder(tmp_path / "r", {"seed": 1}, force=True)
    assert folder.stage("a", lambda: 7) == 7


def test_unfinished_folder_is_never_complete(tmp_path):
    out = tmp_path / "r"
    folder = ReportFolder(out, {})
    (folder.staging / "report.html").write_text("<html>half</html>")
    folder.abandon()
    assert not (out / "report.html").exists() and not is_complete(out)
    with pytest.raises(HeadlensError, match="no complete headlens report"):
        Report.load(out)


def test_publish_replaces_an_old_report_and_load_reads_it_back(tmp_path):
    rep = fake_report(tmp_path / "r")
    assert is_complete(rep.out) and not (rep.out / ".staging").exists() and not (rep.out / ".checkpoints").exists()
    back = Report.load(rep.out)
    pd.testing.assert_frame_equal(back.heads[["layer", "head", "role"]], rep.heads[["layer", "head", "role"]])
    assert np.allclose(back.heads.importance, rep.heads.importance, rtol=1e-5)
    assert back.plan == {"heads": {"0": [1]}} and set(back.figures) == set(rep.figures)
    # the old report stays complete until a new one replaces it; a crash in between breaks nothing
    run = json.loads((rep.out / "run.json").read_text())
    assert run["status"] == "complete"
    fake_report(tmp_path / "r")
    assert is_complete(rep.out)


def test_tables_are_written_byte_stable(tmp_path):
    df = pd.DataFrame(dict(layer=[0, 1], head=[1, 0], x=[1 / 3, 2e-9], role=["a", "b"]))
    write_table(df, tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_bytes() == b"layer,head,x,role\n0,1,0.333333,a\n1,0,2e-09,b\n"


# --- rendering -----------------------------------------------------------------------------
def test_html_is_one_self_contained_page(tmp_path):
    rep = fake_report(tmp_path / "r")
    page = (rep.out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not load anything from the web"
    assert "<link" not in page and page.count("<table") == 4
    assert "fake &lt;b&gt;model&lt;/b&gt;" in page, "text from the run must be escaped"
    assert "head 0.0 (+0.500, 95% CI [0.400, 0.600]" in page  # the top head, from the numbers


def test_markdown_references_figures_by_relative_path(tmp_path):
    rep = fake_report(tmp_path / "r")
    md = (rep.out / "report.md").read_text()
    for path in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert not Path(path).is_absolute() and (rep.out / path).is_file()
    assert "| layer | head |" in md


def test_findings_follow_the_numbers(tmp_path):
    rep = fake_report(tmp_path / "r")
    text = " ".join(render.findings(rep))
    n_above = int((rep.heads.importance_ci_low > 0).sum())
    assert f"{n_above} of 12 heads" in text
    assert "Role census: 6 previous-token, 3 first-token sink, 3 broad." in text
    rho = rep.heads[["grad_importance", "importance"]].corr(method="spearman").iloc[0, 1]
    assert f"rho = {rho:.2f}" in text

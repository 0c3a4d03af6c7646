"""headlens report: the output folder (atomic, resumable, deterministic), the rendered pages and
the pipeline end to end on a tiny random GPT-2 (the CLI has its own tests in test_cli.py)."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import headlens
from headlens.data import DATA_DIR
from headlens.errors import HeadlensError
from headlens.reporting import render
from headlens.reporting.folder import ReportFolder, is_complete, write_table
from headlens.reporting.result import Report, write_report_files


def tiny_decoder_folder(folder: Path) -> Path:
    """A random GPT-2 (3 layers x 4 heads, d_model 32) with a word-level tokenizer over the
    bundled texts' words (~1.7k tokens, so the LM head is cheap), saved as a transformers folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = DATA_DIR
    text = " ".join(p.read_text() for p in [data / "tasks" / "pydoc_text.txt", data / "text" / "sentences.txt",
                                              data / "tasks" / "ioi.jsonl"])
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                  bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
                             grad_importance=abs(imp), grad_importance_raw=abs(imp) * 2,
                             score_previous_token=rng.random()))
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
    rep = Report(out, heads, clusters, pruning, {"0": [1]}, figures, run)
    write_report_files(rep, folder)
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
    assert folder.resumed == ["a"] and set(folder.seconds["a"]) == {"wall", "cpu"}
    folder.abandon()
    with pytest.raises(HeadlensError, match="another configuration"):
        ReportFolder(tmp_path / "r", {"seed": 1})
    folder = ReportFolder(tmp_path / "r", {"seed": 1}, force=True)
    assert folder.stage("a", lambda: 7) == 7


def test_elapsed_time_sums_every_attempt(tmp_path):
    """Attempt 1 finishes stage a, then is SIGKILLed inside stage b after the sweep wrote a chunk
    (no Python code runs: the object is just dropped); attempt 2 fails and is abandoned; attempt 3
    resumes. Each counts, the killed one up to the last resume file it wrote. The folder's times
    are compared with the test's own clock around each attempt, so a loaded machine cannot make
    it fail, while counting the lost 1.5 s would."""
    import time

    def busy(cpu_seconds):  # CPU time, which sleeping does not use
        start = time.process_time()
        while time.process_time() - start < cpu_seconds:
            pass

    out, config = tmp_path / "r", {"seed": 0}
    t0 = time.perf_counter()
    folder = ReportFolder(out, config)
    folder.stage("a", lambda: time.sleep(0.2) or 1)
    time.sleep(0.3)
    (folder.sweep_resume_dir() / "chunk.json").write_bytes(b"0")
    first = time.perf_counter() - t0  # the killed attempt's work ends here
    time.sleep(1.5)  # killed here: lost, nothing records it
    folder.lock.release()  # what the OS does when the process dies
    folder = ReportFolder(out, config)
    assert folder.attempts[0]["wall"] == pytest.approx(first, abs=0.3)
    t1 = time.perf_counter()
    time.sleep(0.2)
    folder.abandon()
    second = time.perf_counter() - t1
    t2 = time.perf_counter()
    folder = ReportFolder(out, config)
    assert folder.stage("a", lambda: 2) == 1 and folder.resumed == ["a"]
    folder.stage("c", lambda: busy(0.3))
    spent = folder.elapsed()
    third = time.perf_counter() - t2
    assert spent["attempts"] == 3
    assert folder.attempts[1]["wall"] == pytest.approx(second, abs=0.3)
    assert folder.attempts[2]["wall"] <= third + 0.05 and spent["cpu"] >= 0.3
    assert spent["wall"] == pytest.approx(sum(a["wall"] for a in folder.attempts), abs=0.05)
    assert spent["wall"] == pytest.approx(first + second + third, abs=0.6)
    folder.abandon()
    t3 = time.perf_counter()
    folder = ReportFolder(out, config, force=True)  # discarded resume state: its time goes too
    assert len(folder.attempts) == 1 and folder.elapsed()["wall"] <= time.perf_counter() - t3 + 0.05


def test_a_run_that_fails_before_any_stage_leaves_nothing(tmp_path):
    from headlens.reporting.pipeline import report

    with pytest.raises(HeadlensError, match="no-such-model"):
        report("no-such-model", out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_unfinished_folder_is_never_complete(tmp_path):
    out = tmp_path / "r"
    folder = ReportFolder(out, {})
    folder.stage("scores", lambda: 1)
    (folder.staging / "report.html").write_text("<html>half</html>")
    folder.abandon()
    assert not (out / "report.html").exists() and not is_complete(out)
    with pytest.raises(HeadlensError, match="no complete headlens report"):
        Report.load(out)


def test_publish_replaces_an_old_report_and_load_reads_it_back(tmp_path):
    rep = fake_report(tmp_path / "r")
    assert is_complete(rep.out) and not (rep.out / ".staging").exists() and not (rep.out / ".resume").exists()
    back = Report.load(rep.out)
    pd.testing.assert_frame_equal(back.heads[["layer", "head", "role"]], rep.heads[["layer", "head", "role"]])
    assert np.allclose(back.heads.importance, rep.heads.importance, rtol=1e-5)
    assert back.plan == {"0": [1]} and back.plan_record["schema"] == "headlens.prune_plan"
    assert set(back.figures) == set(rep.figures)
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


def test_top_heads_give_their_q_value_to_two_significant_digits():
    from types import SimpleNamespace

    from headlens.reporting.claims import top_head_note

    assert top_head_note(SimpleNamespace(q_value=0.004, p_holm=0.5)) == ", q = 0.004"
    assert top_head_note(SimpleNamespace(q_value=1.4e-10, p_holm=1e-9)) == ", q = 1.4e-10; family-wise significant (Holm)"


def test_findings_follow_the_numbers(tmp_path):
    rep = fake_report(tmp_path / "r")
    text = " ".join(render.findings(rep))
    n_above = int((rep.heads.importance_ci_low > 0).sum())
    assert f"{n_above} of 12 heads" in text and "uncorrected" in text  # no q-values: the old rule, said
    q = np.linspace(0.001, 0.5, 12)
    rep.heads = rep.heads.assign(q_value=q, p_holm=np.minimum(1, q * 6), p_value=q / 2)
    text = " ".join(render.findings(rep))
    damage = rep.heads.importance  # lm_loss: lower is better, damage = importance
    needed = int(((rep.heads.q_value < 0.05) & (damage > 0)).sum())
    strict = int(((rep.heads.p_holm < 0.05) & (damage > 0)).sum())
    assert f"{needed} of 12 heads ({needed / 12:.0%}) are needed" in text and "Benjamini-Hochberg" in text
    assert f"{strict} of them also at a family-wise error rate of 5% (Holm)" in text
    # controls and power: said first when they undercut the rest, else after the head findings
    power = dict(sd=0.2, effect=0.01, effect_label="10%", alpha=0.05, power=0.8, n_tests=12, n_examples=10,
                 n_needed=3000, n_needed_familywise=5000, detectable=0.2, sweep_sd=0.001, sweep_detectable=0.002)
    controls = dict(full=1.0, uniform=0.9, ablated=0.8, chance=0.0, kept_uniform=0.9, kept_ablated=0.8,
                    needs_attention=False, ablation="zero")
    rep.run["results"].update(power=power, controls=controls)
    found = render.findings(rep)
    assert found[0].startswith("Caution: this task keeps most of its metric without attention (up to 90% of the "
                               "full model's gain over chance)")
    assert not any(f.startswith("Warning") for f in found)  # the sweep's own paired SD detects 0.002 <= 0.01
    rep.run["results"]["power"] = dict(power, sweep_detectable=0.05)
    rep.run["results"]["controls"] = dict(controls, uniform=0.1, ablated=0.0, kept_uniform=0.1, kept_ablated=0.0,
                                          needs_attention=True)
    found = render.findings(rep)
    assert found[0].startswith("Warning: too few examples") and "needs 3000 examples" in found[0]
    said = [f for f in found if f.startswith("Task-sensitivity controls")]
    assert len(said) == 1 and said[0].startswith("Task-sensitivity controls: the task needs attention; without it, "
                                                 "at most 10% of the full model's gain over chance is left.")
    assert "; 0 with every head zero-ablated, i.e. no attention output at all (at or below chance" in said[0]
    assert "0.100 with every head's attention uniform over the visible keys, a bag-of-words floor (10% of the gain left)" \
        in said[0]
    rep.run["results"]["controls"] = dict(controls, full=0.2, above_chance=False, kept_uniform=None,
                                          kept_ablated=None, needs_attention=None)
    caution = render.findings(rep)[0]
    assert caution.startswith("Caution: the full model does no better than chance on this task (lm_loss 0.200, "
                              "chance level 0)") and "gain" not in caution
    assert "Role census: 6 previous-token, 3 first-token sink, 3 broad." in text
    rho = pd.concat([rep.heads.grad_importance_raw, rep.heads.importance.abs()], axis=1).corr(method="spearman")
    assert f"rho = {rho.iloc[0, 1]:.2f}" in text


# --- the pipeline on a tiny model ----------------------------------------------------------
RUN = dict(task="lm", n_examples=8, n_bootstrap=100, batch_size=8, seed=0, prune_target=0.25)
TABLES = ["heads.csv", "clusters.csv", "pruning.csv"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_decoder_folder(tmp_path_factory.mktemp("tiny") / "tiny-gpt2")


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """The report on the tiny model, and (task size, result) of every single-head sweep it ran."""
    import headlens.importance.sweep as sweep
    from headlens.reporting.pipeline import report

    swept, original = [], sweep.sweep_metrics

    def counted(model, task, *args, **kwargs):
        swept.append((len(task), original(model, task, *args, **kwargs)))
        return swept[-1][1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sweep, "sweep_metrics", counted)
        return report(str(tiny_folder), out=tmp_path_factory.mktemp("rep") / "r", progress=False, **RUN), swept


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
    return tiny_run[0]


def test_report_writes_every_output(tiny_report):
    rep, out = tiny_report, tiny_report.out
    for name in ["heads.csv", "heads.parquet", "clusters.csv", "pruning.csv", "prune_plan.json", "report.md",
                 "run.json", "report.html", "attention_view.json"]:
        assert (out / name).is_file(), name
    assert not (out / ".staging").exists() and not (out / ".resume").exists()
    heads = pd.read_csv(out / "heads.csv")
    need = ["layer", "head", "role", "pattern_class", "cluster", "importance", "importance_se",
            "importance_ci_low", "importance_ci_high", "grad_importance", "score_previous_token",
            "score_first_token", "score_induction", "score_entropy"]
    assert list(heads.columns[:2]) == ["layer", "head"] and set(need) <= set(heads.columns)
    assert list(zip(heads["layer"], heads["head"])) == [(layer, h) for layer in range(3) for h in range(4)]
    assert (heads.importance_ci_low <= heads.importance).all() and (heads.importance <= heads.importance_ci_high).all()
    pruning = pd.read_csv(out / "pruning.csv")
    assert set(pruning.method) == {"michel", "ablation", "random"}
    assert {"ci_low", "ci_high", "p_vs_random"} <= set(pruning.columns)
    assert (pruning.ci_low <= pruning.metric + 1e-9).all() and (pruning.metric <= pruning.ci_high + 1e-9).all()
    assert pruning.query("method == 'random'").p_vs_random.isna().all()
    assert {"p_value", "q_value", "p_holm"} <= set(heads.columns) and (heads.q_value >= heads.p_value).all()
    for name in ["heads_by_importance", "clusters", "pruning_curve"]:
        tex = (out / "tables" / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\bottomrule" in tex, name
    results = json.loads((out / "run.json").read_text())["results"]
    assert {"controls", "power", "statistics", "reproducibility", "grad_vs_ablation"} <= set(results)
    assert sorted(results["reproducibility"]["split"]["selection_ids"]
                  + results["reproducibility"]["split"]["heldout_ids"]) == list(range(RUN["n_examples"]))
    for name, rel in rep.run["figures"].items():
        assert (out / rel).is_file() and (out / rel).with_suffix(".svg").is_file(), name
        assert (out / rel).with_suffix(".pdf").read_bytes().startswith(b"%PDF"), name
    assert {"importance", "grad_vs_ablation", "clustermap", "embedding", "gallery", "pruning_curve"} <= set(rep.figures)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["seed"] == 0 and run["config"]["task"] == "lm"
    assert {"headlens", "torch", "transformers", "transformer-lens", "scikit-learn", "pandas"} <= set(run["versions"])
    assert run["timings_s"]["total"] > 0 and run["platform"]["python"]
    back = Report.load(out)
    assert back.heads.shape == rep.heads.shape and back.plan == rep.plan


@pytest.mark.slow
def test_same_seed_gives_byte_identical_tables(tiny_report, tiny_folder, tmp_path):
    from headlens.reporting.pipeline import report

    again = report(str(tiny_folder), out=tmp_path / "again", progress=False, **RUN)
    for name in TABLES:
        assert (again.out / name).read_bytes() == (tiny_report.out / name).read_bytes(), name


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_tables(tiny_report, tiny_folder, tmp_path):
    """SIGKILL the CLI once a stage has been checkpointed; the re-run resumes (the finished stages
    are not recomputed), and the tables equal those of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "headlens", "report", "--model", str(tiny_folder), "--out", str(out),
           "--task", RUN["task"], "--n-examples", str(RUN["n_examples"]), "--n-bootstrap", str(RUN["n_bootstrap"]),
           "--batch-size", str(RUN["batch_size"]), "--prune-target", str(RUN["prune_target"]), "--no-progress",
           "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / ".resume" / "clusters.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in (out / ".resume").glob("*.json")} - {"run", "attempts"}
    assert "scores" in finished and not (out / "report.html").exists() and not is_complete(out)
    with pytest.raises(HeadlensError, match="no complete"):
        Report.load(out)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert finished <= set(run["resumed_stages"]) and len(run["attempts"]) == 2
    assert set(run["stage_seconds"]) == {"scores", "clusters", "controls", "ablation", "gradients", "pruning"}
    for name in TABLES:
        assert (out / name).read_bytes() == (tiny_report.out / name).read_bytes(), name


def test_resumed_run_records_the_time_of_every_attempt(tiny_folder, tmp_path, monkeypatch):
    """A run that fails in the gradient stage, then its resume: run.json's total is the time of
    both attempts (not only the resumed one's), and it names the stages the first one computed."""
    import time

    import headlens.importance.gradients
    from headlens.reporting.pipeline import report

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(headlens.importance.gradients, "gradient_importance", broken)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="out of memory"):
            report(str(tiny_folder), out=out, progress=False, **RUN)
        first = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(str(tiny_folder), out=out, progress=False, **RUN)
    second = time.perf_counter() - t0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_stages"] == ["scores", "clusters", "controls", "ablation"] and len(run["attempts"]) == 2
    total = run["timings_s"]["total"]
    assert second < total <= first + second
    assert total == pytest.approx(sum(a["wall_s"] for a in run["attempts"]), abs=0.01)
    assert run["timings_s"]["ablation sweep"] >= run["stage_seconds"]["ablation"]["wall"]
    assert "over 2 attempts (resumed)" in (out / "report.html").read_text()


def test_the_sweep_runs_once(tiny_run):
    """One single-head sweep of the whole task serves the importance table and the pruning curve."""
    assert [n for n, _ in tiny_run[1]] == [RUN["n_examples"]]


def test_pruning_curve_reads_the_sweep_on_the_selection_split(tiny_run, tiny_folder):
    """The report's ablation pruning curve is pruning_curve's, given the report's sweep (per-example
    metrics of all examples) restricted to the selection split's examples (test_pruning.py checks
    that this restriction equals a sweep of the split itself)."""
    from headlens.importance.statistics import importance_table
    from headlens.pruning.curve import pruning_curve, selection_split
    from headlens.reporting.pipeline import PRUNE_SPLIT, _load_task

    rep, [(_, (heads, clean, ablated))] = tiny_run
    model = headlens.load(str(tiny_folder))
    task = _load_task(model, RUN["task"], None, RUN["n_examples"])
    select, _, rows = selection_split(task, PRUNE_SPLIT, RUN["seed"])
    sweep = importance_table(heads, clean[rows], {h: v[rows] for h, v in ablated.items()}, select, n_bootstrap=0)
    expect = pruning_curve(model, task, methods=("ablation",), target=RUN["prune_target"], floor=0.9,
                           seed=RUN["seed"], batch_size=RUN["batch_size"], sweep=sweep, progress=False).curve
    got = pd.read_csv(rep.out / "pruning.csv").query("method == 'ablation'")
    assert got["n_pruned"].tolist() == expect["n_pruned"].tolist()
    for col in ["metric", "metric_selection", "relative"]:
        np.testing.assert_allclose(got[col], expect[col], rtol=1e-5, err_msg=col)
    assert got["within_floor"].tolist() == expect["within_floor"].tolist()


def test_a_study_section_is_added_and_survives_load(tmp_path):
    import matplotlib.pyplot as plt

    rep = fake_report(tmp_path / "r")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1])
    fig.savefig(tmp_path / "extra.png")
    plt.close(fig)
    rep.add_section("Within vs between layers", paragraphs=["Heads in a layer look alike."],
                    notes=["mean JS within 0.1", "between 0.3"],
                    tables={"Distances": pd.DataFrame(dict(layer=[0, 1], within=[0.1, 0.2]))},
                    figures={"Extra figure": (tmp_path / "extra.png", "A line.")})
    back = Report.load(rep.out)
    page = (rep.out / "report.html").read_text()
    assert "Within vs between layers" in page and "Heads in a layer look alike." in page
    assert page.count("<img") == 5 and "mean JS within 0.1" in page
    assert (rep.out / "within_vs_between_0.csv").is_file()
    assert "figures/within_vs_between_0.png" in (rep.out / "report.md").read_text()
    assert back.run["sections"][0]["title"] == "Within vs between layers" and len(back.figures) == 5


def test_metric_option_picks_the_task_and_its_metric(tiny_folder):
    from headlens.reporting.pipeline import _load_task

    model = headlens.load(str(tiny_folder))
    assert _load_task(model, None, None, 4).name == "ioi"  # a decoder's bundled task
    assert _load_task(model, "ioi", "accuracy", 4).metric_name == "accuracy"
    assert _load_task(model, "text", "kl", 4).metric_name == "kl_divergence"
    assert _load_task(model, "text", "lm", 4).metric_name == "lm_loss"
    with pytest.raises(HeadlensError, match="metric 'accuracy' does not apply"):
        _load_task(model, "lm", "accuracy", 4)

"""``headlens circuits`` and ``headlens report --circuits``: every file written, atomically and
resumably; bad input answered with one line and exit status 2."""
import json

import pandas as pd
import pytest
from test_report import tiny_decoder_folder

import headlens.reporting.circuits as report_circuits
from headlens.cli import main
from headlens.reporting.pipeline import Report, report

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
FILES = ["patching.csv", "patching_positions.csv", "path_patching.csv", "composition.csv", "copying.csv",
         "edges.csv", "faithfulness.csv", "verification.csv", "circuit.json", "circuits.md", "run.json"]
TOY = ["circuits", "--model", "toy-induction-2l", "--task", "induction", "--n-examples", "12", "--n-bootstrap",
       "50", "--activations", "z,k", "--ig-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_decoder_folder(tmp_path_factory.mktemp("tiny") / "tiny-gpt2")


def test_circuits_command_writes_every_file_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "toy"

    def broken(*args, **kwargs):
        raise RuntimeError("killed while extracting the circuit")

    with monkeypatch.context() as m:  # a run that dies in its last analysis
        m.setattr(report_circuits, "extract_circuit", broken)
        with pytest.raises(RuntimeError):
            main(TOY + ["--out", str(out)])
    assert not (out / "circuit.json").exists() and not (out / "run.json").exists()
    assert (out / ".resume" / "patching.json").is_file()
    assert main(TOY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1.0 <- 0.2" in printed and "verified by exact patching" in printed
    for name in FILES:
        assert (out / name).is_file(), name
    for name in ("circuit_graph", "composition", "faithfulness", "patching"):
        assert (out / "figures" / f"{name}.png").is_file() and (out / "figures" / f"{name}.svg").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and {"patching", "paths", "composition"} <= set(run["resumed_stages"])
    assert "circuit" not in run["resumed_stages"]
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["n_edges"] == len(circuit["edges"]) > 0 and circuit["verified"]["n_examples"] == 6
    paths = pd.read_csv(out / "path_patching.csv")
    assert list(paths.columns[:8]) == ["sender_layer", "sender_head", "receiver_layer", "receiver_head", "via",
                                       "effect", "ci_low", "ci_high"]
    composition = pd.read_csv(out / "composition.csv")
    assert {"score", "baseline_p95"} <= set(composition.columns) and set(composition.via) == {"q", "k", "v"}
    assert len(pd.read_csv(out / "verification.csv")) == 3
    assert not (out / ".staging").exists() and not (out / ".resume").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "minilm"], "post-norm"),
    (["--model", "TINY", "--task", "lm"], "corrupted"),
    (["--model", "toy-induction-2l", "--task", "ioi"], "tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tiny_folder, tmp_path, capsys):
    args = [str(tiny_folder) if a == "TINY" else a for a in args]
    assert main(["circuits", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headlens: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "circuit.json").exists()


@pytest.mark.slow
def test_report_has_a_circuits_section(tiny_folder, tmp_path):
    rep = report(str(tiny_folder), task="ioi", out=tmp_path / "r", n_examples=8, n_bootstrap=20, batch_size=4,
                 n_clusters=2, progress=False, circuits=True)
    section = next(s for s in rep.run["sections"] if s["id"] == "circuits")
    assert any("verified by exact patching" in n for n in section["notes"])
    assert section["tables"][0]["title"].startswith("Circuit faithfulness")
    assert (rep.out / "circuits" / "circuit.json").is_file() and (rep.out / "circuits" / "dla.csv").is_file()
    html = rep.html.read_text()
    assert "Circuits" in html and "stated (exact, selection examples)" in html and "verified (exact" in html
    loaded = Report.load(rep.out)
    assert "circuits_circuit_graph" in loaded.figures and loaded.figures["circuits_circuit_graph"].is_file()

"""The ``headlens`` command line: complete help, ``headlens report`` end to end on a tiny model,
and bad input answered with a one-line error and exit status 2."""
import json
import subprocess
import sys

import pytest
from test_report import tiny_decoder_folder

from headlens.cli import build_parser, main


def subcommand_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices


def test_every_subcommand_and_argument_has_help():
    parser, subs = subcommand_parsers()
    assert "report" in subs
    for name, p in subs.items():
        assert p.description, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, f"headlens {name} {action.option_strings}"


def test_help_runs_from_the_shell():
    res = subprocess.run([sys.executable, "-m", "headlens", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "report" in res.stdout
    res = subprocess.run([sys.executable, "-m", "headlens", "report", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for option in ["--model", "--task", "--out", "--ablation", "--metric", "--batch-size", "--device", "--dtype",
                   "--seed", "--n-examples", "--prune-target", "--no-progress", "--resume", "--force"]:
        assert option in res.stdout, option


def test_report_command_end_to_end(tmp_path, capsys):
    model = tiny_decoder_folder(tmp_path / "tiny")
    out = tmp_path / "report"
    code = main(["report", "--model", str(model), "--out", str(out), "--n-examples", "8", "--n-bootstrap", "50",
                 "--prune-target", "0.25", "--seed", "3", "--ablation", "mean", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Top 8 heads" in printed and "Role census" in printed and "Pruning heads together" in printed
    assert str(out / "report.html") in printed
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["data"]["task"] == "ioi"  # a decoder's bundled task
    assert run["config"]["seed"] == 3 and run["config"]["ablation"] == "mean"
    assert run["command"].startswith("headlens report --model ") and "--seed 3" in run["command"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--ablation", "zero", "--n-examples", "1"], "n_examples"),
    (["--prune-target", "1.5"], "prune_target"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    code = main(["report", "--out", str(tmp_path / "r"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("headlens: error:") and message in err
    assert "Traceback" not in err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["report", "--out", str(tmp_path / "file"), "--no-progress"])
    assert code == 2 and "is a file" in capsys.readouterr().err

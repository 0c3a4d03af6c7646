"""torch.distributed: ``torchrun -m headlens report`` on two CPU processes (gloo, loopback only)
writes the tables one process writes; a rank killed in the middle of the sweep is restarted by
``torchrun --max-restarts`` and the job resumes from the shared resume folder, recomputing no
unit it had finished, and ends with the same tables.

The jobs run ``python -m torch.distributed.run`` (torchrun) on a small driver that logs every
sweep unit a rank saves (attempt, rank, file) and, when asked, SIGKILLs rank 1 right after its
first save in the first attempt -- no ``finally`` block runs.
"""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from headlens.cli import main
from headlens.io.native import save_model
from headlens.reporting.folder import is_complete

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and loopback gloo")

TABLES = ["heads.csv", "clusters.csv", "pruning.csv", "distance.csv"]

DRIVER = r'''
import os, signal, sys
import headlens.importance.sweep as sweep

attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
log = open(os.environ["HL_LOG"], "a", buffering=1)
original = sweep.SweepResume.save

def save(self, layer, heads, values, **unit):
    original(self, layer, heads, values, **unit)
    log.write(f"{attempt} {rank} {self.unit(layer, heads, **unit)}\n")
    if os.environ.get("HL_KILL") and attempt == "0" and rank == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-sweep, after one finished unit

sweep.SweepResume.save = save
from headlens.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    return save_model(tiny_gpt2, tmp_path_factory.mktemp("model") / "tiny-gpt2")


def report_args(model_dir, out) -> list:
    return ["report", "--model", str(model_dir), "--task", "lm", "--n-examples", "8", "--batch-size", "2",
            "--n-bootstrap", "50", "--n-clusters", "3", "--prune-target", "0.2", "--no-progress", "--quiet",
            "--out", str(out)]


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The report one process writes (this process, one thread)."""
    import torch

    out, threads = tmp_path_factory.mktemp("single") / "report", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(report_args(model_dir, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def torchrun(tmp_path, args, log, *extra, kill=False):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, HL_LOG=str(log), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               HL_KILL="1" if kill else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
           str(driver), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def assert_same_tables(out, reference) -> None:
    assert is_complete(out)
    for name in TABLES:
        got, want = pd.read_csv(out / name), pd.read_csv(reference / name)
        pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-5, rtol=0)  # same rows, same order
    assert json.loads((out / "prune_plan.json").read_text()) == json.loads((reference / "prune_plan.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_write_the_tables_of_one(model_dir, single, tmp_path):
    out = tmp_path / "report"
    saves = torchrun(tmp_path, report_args(model_dir, out), tmp_path / "saves.log")
    assert_same_tables(out, single)
    ranks = {rank for _, rank, _ in saves}
    assert ranks == {"0", "1"}, f"the sweep's units were not shared out over both ranks: {saves}"
    assert len(saves) == len({name for _, _, name in saves}) == 3  # each unit once (one per layer)
    assert json.loads((out / "run.json").read_text())["config"] == json.loads((single / "run.json").read_text())["config"]


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_job_resumes(model_dir, single, tmp_path):
    out = tmp_path / "report"
    saves = torchrun(tmp_path, report_args(model_dir, out) + ["--keep-resume"], tmp_path / "saves.log",
                     "--max-restarts", "1", kill=True)
    first = {name for attempt, _, name in saves if attempt == "0"}
    second = {name for attempt, _, name in saves if attempt == "1"}
    assert ("0", "1") in {(a, r) for a, r, _ in saves}, "rank 1 did not save a unit before it was killed"
    assert first and second, f"the kill did not land in the middle of the sweep: {saves}"
    assert not first & second, f"units finished before the kill were computed again: {first & second}"
    assert first | second == {p.stem for p in (out / ".resume").glob("sweep-*/layer*.safetensors")}
    assert not list((out / ".resume").rglob("*.tmp"))
    assert_same_tables(out, single)
    assert "scores" in json.loads((out / "run.json").read_text())["resumed_stages"]

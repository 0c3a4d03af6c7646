"""Resumable, nothing lost: a sweep (alone, or inside ``headlens report``) killed with SIGKILL
resumes where it stopped, recomputes nothing it had finished, and ends with exactly the tables
of an uninterrupted run; a half-written report folder is never taken for a finished report.

The work runs in a child process (``DRIVER`` below) that logs every per-head checkpoint it writes
and every metric evaluation. To kill it at a known point, the first run hangs right after its
N-th checkpoint (``HL_HANG_AFTER``); the test waits for that and sends SIGKILL -- no ``finally``
block, no atexit handler runs. The second run is the same command without the hang.
(``test_report.py`` kills a report between stages; here the kill lands inside the sweep stage.)
"""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import headlens
from headlens.errors import HeadlensError
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.io.native import save_model
from headlens.reporting.folder import is_complete, write_table

pytestmark = [pytest.mark.skipif(os.name != "posix", reason="SIGKILL"),
              pytest.mark.usefixtures("one_thread")]

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "it rains", "we walked to the old bridge and back", "one two three"]
N_HEADS = 12  # tiny GPT-2: 3 layers x 4 heads

DRIVER = r'''
import os, sys, time
import headlens.importance.sweep as sweep
import headlens.importance.tasks as tasks

log = open(os.environ["HL_LOG"], "a", buffering=1)
hang_after = int(os.environ.get("HL_HANG_AFTER", "0"))
saves = [0]
original_save, original_score = sweep.SweepResume.save, tasks.LMLossTask.score

def save(self, layer, heads, values, **unit):
    original_save(self, layer, heads, values, **unit)
    log.write(f"save {self.unit(layer, heads, **unit)}\n")
    saves[0] += 1
    if saves[0] == hang_after:
        time.sleep(600)  # the test kills the process here

def score(self, *args, **kwargs):
    log.write("score\n")
    return original_score(self, *args, **kwargs)

sweep.SweepResume.save, tasks.LMLossTask.score = save, score
mode, args = sys.argv[1], sys.argv[2:]
if mode == "sweep":
    import headlens
    from headlens.reporting.folder import write_table
    model_dir, resume_dir, out = args
    table = sweep.ablation_sweep(headlens.load(model_dir), tasks.LMLossTask(%(texts)r), "mean", batch_size=2,
                                 n_bootstrap=200, memory_budget_mb=1e-6, resume_dir=resume_dir,
                                 progress=False)
    write_table(table, __import__("pathlib").Path(out))
else:
    from headlens.cli import main
    sys.exit(main(sys.argv[1:]))
''' % {"texts": TEXTS}


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    return save_model(tiny_gpt2, tmp_path_factory.mktemp("model") / "tiny-gpt2")


def launch(tmp_path, args, log, hang_after=0, hash_seed=0):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, HL_LOG=str(log), HL_HANG_AFTER=str(hang_after), PYTHONHASHSEED=str(hash_seed),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, str(driver), *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_after_saves(proc, log, n: int, timeout: float = 180) -> None:
    """Wait until the child logged its n-th checkpoint (and hangs there), then SIGKILL it."""
    deadline = time.time() + timeout
    while len(saved(log)) < n:
        assert proc.poll() is None, f"the child exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the child did not reach the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def finish(proc, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def saved(log) -> list:
    lines = log.read_text().splitlines() if log.exists() else []
    return [x.split()[1] for x in lines if x.startswith("save ")]


def scored(log) -> int:
    return sum(x == "score" for x in log.read_text().splitlines())


def mtimes(folder) -> dict:
    """Each saved sweep unit's record (``<unit>.json``, written last) and when it was written."""
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("layer*.json")}


@pytest.mark.slow  # two interpreter starts
def test_killed_sweep_resumes_without_recomputing(model_dir, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "sweep.csv"
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proc = launch(tmp_path, ["sweep", model_dir, checkpoints, out], first, hang_after=5, hash_seed=1)
    kill_after_saves(proc, first, 5)
    done = mtimes(checkpoints)
    assert sorted(done) == sorted(saved(first)) and len(done) == 5
    assert not out.exists() and not list(checkpoints.glob("*.tmp"))

    finish(launch(tmp_path, ["sweep", model_dir, checkpoints, out], second, hash_seed=2))
    redone = saved(second)
    assert not set(redone) & set(done), "finished heads were computed again"
    assert len(redone) == N_HEADS - 5 and len(mtimes(checkpoints)) == N_HEADS
    assert {k: v for k, v in mtimes(checkpoints).items() if k in done} == done  # untouched
    n_batches = 3
    assert scored(second) == n_batches * (1 + N_HEADS - 5)  # the clean metric, then only the missing heads

    model = headlens.load(model_dir)
    reference = ablation_sweep(model, LMLossTask(TEXTS), "mean", batch_size=2, n_bootstrap=200,
                               memory_budget_mb=1e-6, progress=False)
    write_table(reference, tmp_path / "reference.csv")
    assert out.read_bytes() == (tmp_path / "reference.csv").read_bytes()
    table = pd.read_csv(out)
    assert len(table) == N_HEADS and not table.duplicated(["layer", "head"]).any()


def test_damaged_checkpoint_files_are_recomputed_not_trusted(tiny_gpt2, tmp_path, monkeypatch):
    """A sweep chunk file that cannot be read (truncated, or holding the wrong shape) is computed
    again, and only it; an unreadable sweep.json is refused with a HeadlensError."""
    import numpy as np

    from headlens.storage.records import save_record

    kwargs = dict(batch_size=2, n_bootstrap=50, memory_budget_mb=1e-6, progress=False, resume_dir=tmp_path)
    task = LMLossTask(TEXTS)
    first = ablation_sweep(tiny_gpt2, task, "zero", **kwargs)
    files = sorted(tmp_path.glob("layer*.safetensors"))
    assert len(files) == N_HEADS
    files[3].write_bytes(files[3].read_bytes()[:40])  # torn
    save_record(tmp_path, files[7].stem, np.zeros((3, 6)))  # a valid record, not this unit's shape
    calls = []
    original = LMLossTask.score
    monkeypatch.setattr(LMLossTask, "score", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    again = ablation_sweep(tiny_gpt2, task, "zero", **kwargs)
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    assert len(calls) == 3 * (1 + 2)  # 3 batches: the clean metric and the two damaged heads
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(HeadlensError, match="unreadable sweep.json"):
        ablation_sweep(tiny_gpt2, task, "zero", **kwargs)


TABLES = ["heads.csv", "clusters.csv", "pruning.csv", "prune_plan.json"]


@pytest.mark.slow
def test_report_killed_inside_the_sweep_resumes_to_the_tables_of_an_uninterrupted_run(model_dir, tmp_path):
    """``headlens report`` killed inside its sweep stage: the folder is not a report; the same
    command resumes (finished stages and sweep chunks are reused, not recomputed); and its tables
    are byte-identical to those of an uninterrupted run of the command recorded in ``run.json``,
    in the test's own process (another hash seed): repeatable, and run.json suffices."""
    import shlex

    from headlens.reporting.pipeline import Report

    out = tmp_path / "report"
    args = ["report", "--model", model_dir, "--task", "lm", "--n-examples", "8", "--n-bootstrap", "50",
            "--batch-size", "4", "--n-clusters", "3", "--no-progress", "--quiet", "--keep-resume",
            "--out", out]
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    # the report's sweep checkpoints one chunk per layer (all 4 heads fit its memory budget)
    kill_after_saves(launch(tmp_path, args, first, hang_after=2, hash_seed=1), first, 2)

    # the killed run left checkpoints, never a report
    assert not is_complete(out) and not (out / "report.html").exists() and not (out / "run.json").exists()
    with pytest.raises(HeadlensError, match="no complete headlens report"):
        Report.load(out)
    sweep_dir = next((out / ".resume").glob("sweep-*"))
    done = mtimes(sweep_dir)
    assert len(done) == 2 and (out / ".resume" / "scores.json").is_file()

    finish(launch(tmp_path, args, second, hash_seed=2))
    assert is_complete(out)
    assert not set(saved(second)) & set(done) and len(saved(second)) == 1 and len(mtimes(sweep_dir)) == 3
    assert {k: v for k, v in mtimes(sweep_dir).items() if k in done} == done  # not rewritten
    run = json.loads((out / "run.json").read_text())
    assert {"scores", "clusters"} <= set(run["resumed_stages"]) and "ablation" not in run["resumed_stages"]
    heads = Report.load(out).heads
    assert list(zip(heads["layer"], heads["head"])) == [(a, b) for a in range(3) for b in range(4)]

    # the command run.json records, run again uninterrupted in this process (another hash seed),
    # gives the same bytes
    from headlens.cli import main

    command = shlex.split(run["command"])
    assert command[:2] == ["headlens", "report"] and run["config"]["seed"] == 0
    again = tmp_path / "again"
    command[command.index("--out") + 1] = str(again)
    assert main(command[1:] + ["--no-progress", "--quiet"]) == 0
    for name in TABLES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    rerun = json.loads((again / "run.json").read_text())
    assert rerun["config"] == run["config"] and rerun["versions"] == run["versions"]

"""Fault injection on results folders and resume state (issue #20): planted pickles and records, bit
flips over every resume file, inputs edited between a crash and the resume, files of the user's in
the way, model folders written over, two runs at once and a full disk.

One tiny report (random GPT-2, 3 layers x 4 heads, 6 examples) is made once with its resume state
kept; most tests work on copies of it. Figures are not drawn in this process's reports (they do
not enter the tables, and drawing them is most of a tiny report's time); the child-process runs
draw them.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import headlens
from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.importance.resume import SweepResume
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.io.native import load_model, save_model
from headlens.io.to_hf import save_hf
from headlens.patterns.clusters import HeadClusterer
from headlens.reporting import pipeline
from headlens.reporting.folder import ReportFolder
from headlens.storage.folders import HOLDER, MANIFEST, FolderLock, OwnedFolder
from headlens.storage.records import load_record, read_checked_json, value_digest, write_checked_json

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "it rains again", "we walked to the old bridge and back", "one two three four"]
RUN = dict(n_examples=6, n_bootstrap=20, n_clusters=2, batch_size=6, progress=False)
TABLES = ["heads.csv", "clusters.csv", "pruning.csv", "prune_plan.json"]
STAGES = ["scores", "clusters", "controls", "ablation", "gradients", "pruning"]
CLASSES = {"HeadClusterer": HeadClusterer}


@pytest.fixture(scope="module")
def inputs(tiny_gpt2, tmp_path_factory):
    """A headlens checkpoint folder of the tiny GPT-2 and a text task file."""
    root = tmp_path_factory.mktemp("inputs")
    save_model(tiny_gpt2, root / "model")
    (root / "task.txt").write_text("\n".join(TEXTS) + "\n")
    return root


def report(inputs, out, **kwargs):
    """``headlens.report`` on ``inputs`` (figures not drawn: see the module doc)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_figures", lambda *a, **k: {})
        return pipeline.report(str(kwargs.pop("model", inputs / "model")), task=str(kwargs.pop("task", inputs / "task.txt")),
                               out=out, **dict(RUN, **kwargs))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The tiny report, its resume state kept (``.resume/``)."""
    out = tmp_path_factory.mktemp("reference") / "report"
    report(inputs, out, keep_resume=True)
    return out


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, ignore=shutil.ignore_patterns(".headlens.lock*"))
    return to


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def tables(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in TABLES}


def crash_in(stage_function: str):
    """A context in which the report's ``stage_function`` (e.g. ``gradient_importance``) dies."""
    import headlens.importance.gradients as gradients

    mp = pytest.MonkeyPatch()

    def die(*a, **k):
        raise KeyboardInterrupt  # the run is killed here

    mp.setattr(gradients, stage_function, die)
    return mp


# --- nothing runs, nothing damaged is used --------------------------------------------------------
def test_the_planted_pickle_reproduction_runs_no_code(inputs, tmp_path, capsys):
    """Issue #20, case 1: a folder with a planted ``.checkpoints/run.json`` and a pickle whose
    ``__reduce__`` calls ``os.system`` is not a headlens folder: refused, nothing loaded or run."""
    folder, sentinel = tmp_path / "S", tmp_path / "ran"
    (folder / ".checkpoints").mkdir(parents=True)
    (folder / ".checkpoints" / "run.json").write_text('{"key": "0123456789abcdef"}')
    (folder / ".checkpoints" / "clusters.pkl").write_bytes(pickle.dumps(_Evil(sentinel)))
    assert main(["report", "--model", str(inputs / "model"), "--task", "lm", "--out", str(folder), "--no-progress"]) == 2
    assert "not empty and was not written by headlens" in capsys.readouterr().err
    assert not sentinel.exists() and files(folder) == [".checkpoints/clusters.pkl", ".checkpoints/run.json"]


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_planted_files_in_a_report_folder_run_no_code(reference, inputs, tmp_path):
    """Pickles planted in an owned folder's resume state are never read; a planted record naming a
    class is refused (only the classes the stage names are ever built), and recomputed."""
    out = copy(reference, tmp_path / "r")
    sentinel = tmp_path / "ran"
    for stage in STAGES:
        (out / ".resume" / f"{stage}.pkl").write_bytes(pickle.dumps({"result": _Evil(sentinel)}))
    body = read_checked_json(out / ".resume" / "clusters.json")
    assert '"~object": "HeadClusterer"' in json.dumps(body)  # the one class the clusters stage allows
    planted = json.loads(json.dumps(body).replace('"~object": "HeadClusterer"', '"~object": "system"'))
    write_checked_json(out / ".resume" / "clusters.json", planted)  # valid checksum, another class
    rep = report(inputs, out, keep_resume=True)
    assert not sentinel.exists()
    assert "clusters" in rep.run["recomputed_stages"]["damaged"] and "clusters" not in rep.run["resumed_stages"]
    assert set(rep.run["resumed_stages"]) == set(STAGES) - {"clusters"}
    assert tables(out) == tables(reference)


def _flip(path: Path, bit: int) -> bytes:
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(flipped))
    return data


def unit_of(name: str) -> tuple:
    """``(layer, heads, block)`` of a sweep unit's record name (:meth:`SweepResume.unit`)."""
    layer, heads, block = re.fullmatch(r"layer(\d+)_heads([\d-]+)_block(\d+)", name).groups()
    return int(layer), [int(h) for h in heads.split("-")], int(block)


def test_300_bit_flips_over_the_resume_files_never_change_a_result(reference, tmp_path, monkeypatch):
    """Flip one random bit of one random resume file, open the folder as a resumed run does and ask
    the file's stage (or every sweep unit) for its result, a recomputation returning the true
    value: each flip is detected -- the file's stage or unit is computed again, or the damaged
    run / attempts record is set aside -- and every result hashes to the true one. The folder is
    restored between flips (and files are not flushed to disk: that is not what this test is about)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    out = copy(reference, tmp_path / "r")
    resume = out / ".resume"
    config = read_checked_json(resume / "run.json")["config"]
    truth = {s: load_record(resume, s, CLASSES) for s in STAGES}
    digests = {s: value_digest(v, CLASSES) for s, (v, _) in truth.items()}
    sweep = next(resume.glob("sweep-*"))
    fingerprint = read_checked_json(sweep / "sweep.json")
    units = sorted(p.stem for p in sweep.glob("layer*.json"))
    pristine = copy(resume, tmp_path / "pristine")
    files = sorted(p for p in resume.rglob("*") if p.is_file())
    assert len(files) >= 20 and len(units) == 3
    rng = np.random.default_rng(20)
    for trial in range(300):
        path = files[rng.integers(len(files))]
        _flip(path, int(rng.integers(path.stat().st_size * 8)))
        rel, owner = path.relative_to(resume).as_posix(), path.name.split(".")[0]
        recomputed = []
        folder = ReportFolder(out, config)
        try:
            for s in [owner] if owner in STAGES else []:
                value = folder.stage(s, lambda s=s: recomputed.append(s) or truth[s][0], truth[s][1]["inputs"], CLASSES)
                assert value is truth[s][0] or value_digest(value, CLASSES) == digests[s], (trial, rel)
            store = SweepResume(folder.sweep_resume_dir(truth["ablation"][1]["inputs"]), fingerprint)
            missing = [u for u in units if store.load(*unit_of(u)) is None]
        finally:
            folder.abandon()
        if owner in STAGES:
            assert recomputed == [owner] and folder.damaged == [owner] and missing == [], (trial, rel)
        elif rel.endswith("sweep.json"):
            assert len(missing) == 3 and len(folder.damaged) == 1 and "sweep.json" in folder.damaged[0], rel
        elif owner in units:
            assert missing == [owner] and folder.damaged == [], (trial, rel)
        else:  # the run's options or the attempts' seconds: set aside, no result touched
            assert rel in ("run.json", "attempts.json") and missing == [], rel
            assert folder.damaged == [f".resume/{rel}"], (trial, rel, folder.damaged)
        shutil.rmtree(resume)
        shutil.copytree(pristine, resume)


@pytest.mark.slow
def test_flipped_bits_are_recomputed_to_the_same_tables(reference, inputs, tmp_path):
    """A real resumed run after one flipped bit in a file of every stage and of one sweep unit:
    every damaged stage is computed again (and not listed as resumed), and the tables are the
    reference's, byte for byte."""
    out = copy(reference, tmp_path / "r")
    rng = np.random.default_rng(3)
    damaged = [next((out / ".resume").glob(f"{s}.*")) for s in STAGES] + [next((out / ".resume").glob("sweep-*/layer001*"))]
    for path in damaged:
        _flip(path, int(rng.integers(path.stat().st_size * 8)))
    rep = report(inputs, out, keep_resume=True)
    assert sorted(rep.run["recomputed_stages"]["damaged"]) == sorted(STAGES) and rep.run["resumed_stages"] == []
    assert tables(out) == tables(reference)


# --- edited inputs between a crash and the resume -------------------------------------------------
@pytest.mark.slow
def test_edited_task_or_weights_between_crash_and_resume_are_recomputed(inputs, tmp_path):
    """Crash a report in its gradient stage, edit the task file (or replace the weights, keeping
    the file's size and modification time), resume: the stages that read what changed are
    computed again, the others resumed, and the tables equal a fresh run on the edited inputs."""
    edited = copy(inputs, tmp_path / "inputs")
    out = tmp_path / "r"
    mp = crash_in("gradient_importance")
    with pytest.raises(KeyboardInterrupt):
        report(edited, out)
    mp.undo()
    assert (out / ".resume" / "ablation.json").is_file() and not (out / "heads.csv").exists()
    (edited / "task.txt").write_text("\n".join(reversed(TEXTS[1:])) + "\nthe mat sat on the cat\n")
    rep = report(edited, out)
    assert rep.run["resumed_stages"] == ["scores", "clusters"] and rep.run["recomputed_stages"]["stale"] == ["controls", "ablation"]
    fresh = report(edited, tmp_path / "fresh")
    assert tables(out) == tables(fresh.out)

    out2 = tmp_path / "r2"
    mp = crash_in("gradient_importance")
    with pytest.raises(KeyboardInterrupt):
        report(edited, out2)
    mp.undo()
    weights = edited / "model" / "model.safetensors"
    stat = weights.stat()
    other = load_model(edited / "model")
    for p in other.parameters():
        p.data.mul_(1.5)
    save_model(other, tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same time: only content differs
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    rep = report(edited, out2)
    assert rep.run["resumed_stages"] == [] and rep.run["recomputed_stages"]["stale"] == ["scores", "clusters", "controls",
                                                                                       "ablation"]
    fresh = report(edited, tmp_path / "fresh2")
    assert tables(out2) == tables(fresh.out)


def test_a_sweep_resume_folder_refuses_another_task_or_model(tiny_gpt2, tmp_path):
    """``ablation_sweep(resume_dir=...)`` (``headlens importance --resume-dir``) with the same task
    name but other examples, or other weights, is refused -- never a mix of old and new units."""
    kwargs = dict(n_bootstrap=0, progress=False, resume_dir=tmp_path, batch_size=6)
    ablation_sweep(tiny_gpt2, LMLossTask(TEXTS), "zero", heads=[(0, 0), (1, 1)], **kwargs)
    with pytest.raises(HeadlensError, match=r"differs in \['examples'\]"):
        ablation_sweep(tiny_gpt2, LMLossTask(TEXTS[::-1]), "zero", heads=[(0, 0), (1, 1)], **kwargs)
    other = headlens.load(tiny_gpt2)
    other = type(other).from_state_dict(other.cfg, {k: v * 2 for k, v in other.state_dict().items()}, other.tokenizer)
    with pytest.raises(HeadlensError, match=r"differs in \['weights'\]"):
        ablation_sweep(other, LMLossTask(TEXTS), "zero", heads=[(0, 0), (1, 1)], **kwargs)


# --- files of the user's -------------------------------------------------------------------------
def test_a_folder_that_only_looks_like_a_report_keeps_the_users_files(inputs, tmp_path, capsys):
    """Issue #20, case 4: ``X/run.json`` = ``{}`` and ``X/figures/keep.png``: refused, both kept."""
    folder = tmp_path / "X"
    (folder / "figures").mkdir(parents=True)
    (folder / "run.json").write_text("{}")
    (folder / "figures" / "keep.png").write_bytes(b"the user's figure")
    assert main(["report", "--model", str(inputs / "model"), "--task", "lm", "--out", str(folder), "--no-progress"]) == 2
    assert "not empty and was not written by headlens" in capsys.readouterr().err
    assert (folder / "figures" / "keep.png").read_bytes() == b"the user's figure"
    assert (folder / "run.json").read_text() == "{}" and files(folder) == ["figures/keep.png", "run.json"]


def test_a_report_replaces_only_its_own_files(reference, inputs, tmp_path):
    """Files a user adds to a report folder survive the next run; a user's file where the report
    would write is refused before any work (named), and kept."""
    out = copy(reference, tmp_path / "r")
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "keep.png").write_bytes(b"mine")
    (out / "notes.txt").write_text("my notes")
    manifest = read_checked_json(out / MANIFEST)
    assert "heads.csv" in manifest["files"] and "notes.txt" not in manifest["files"]
    report(inputs, out, keep_resume=True)
    assert (out / "figures" / "keep.png").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "my notes"
    fresh = tmp_path / "new"
    OwnedFolder(fresh)  # a folder headlens wrote (its manifest), then a file of the user's
    (fresh / "heads.csv").write_text("the user's table")
    with pytest.raises(HeadlensError, match="holds 'heads.csv', which headlens did not write"):
        ReportFolder(fresh, {})
    assert (fresh / "heads.csv").read_text() == "the user's table"


def test_model_outputs_are_checked_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    """``prune --save-model M`` onto its own model folder, onto a file or a non-empty folder, and
    ``train-toy --out`` onto a model folder are refused before a model loads or training starts."""
    import headlens.io.loading
    import headlens.synthetic.training

    def never(*a, **k):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(headlens.io.loading, "load", never)
    monkeypatch.setattr(headlens.synthetic.training, "train_toy", never)
    model = inputs / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("x")
    cases = [(["prune", "--model", model, "--task", "lm", "--save-model", model], "is where the model was read from"),
             (["prune", "--model", model, "--task", "lm", "--save-model", model, "--overwrite"], "read from"),
             (["prune", "--model", model, "--save-model", tmp_path / "file"], "is a file"),
             (["prune", "--model", model, "--save-model", tmp_path / "full"], "not empty"),
             (["train-toy", "--toy", "first-token", "--out", model], "not empty"),
             (["prune", "--model", model, "--task", "lm", "--out", tmp_path / "full"], "not empty and was not written"),
             (["prune", "--model", model, "--task", "lm", "--out", tmp_path / "prune"],
              "holds 'pruning.csv', which headlens did not write")]
    OwnedFolder(tmp_path / "prune")  # a folder of headlens' with a pruning.csv of the user's
    (tmp_path / "prune" / "pruning.csv").write_text("the user's curve")
    for args, pattern in cases:
        assert main([str(a) for a in args]) == 2, args
        assert pattern in capsys.readouterr().err, args
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert (tmp_path / "full" / "thesis.tex").read_text() == "x"
    assert (tmp_path / "prune" / "pruning.csv").read_text() == "the user's curve"


def test_save_hf_replaces_a_folder_only_when_asked_and_never_the_source(tiny_gpt2, inputs, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.bin").write_text("an older model's file")
    with pytest.raises(HeadlensError, match="not empty"):
        save_hf(tiny_gpt2, out)
    assert (out / "old.bin").exists()
    save_hf(tiny_gpt2, out, overwrite=True)
    assert not (out / "old.bin").exists() and headlens.load(out).cfg.n_heads_total == 12
    loaded = headlens.load(inputs / "model")
    with pytest.raises(HeadlensError, match="is where the model was read from"):
        save_model(loaded, inputs / "model", overwrite=True)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folder left behind


# --- one run at a time ---------------------------------------------------------------------------
def test_a_second_run_on_a_folder_is_refused_naming_the_first(tmp_path):
    first = ReportFolder(tmp_path / "r", {"seed": 0})
    with pytest.raises(HeadlensError, match=rf"in use by another headlens run \(pid {os.getpid()} on "):
        ReportFolder(tmp_path / "r", {"seed": 0}, force=True)  # not even --force touches it
    assert (first.resume / "run.json").is_file()
    with pytest.raises(HeadlensError, match="in use"):
        FolderLock(tmp_path / "r").acquire()  # the lock alone, as prune / scores --out take it
    first.abandon()
    lock = FolderLock(tmp_path / "r").acquire()  # free again once the first let it go
    assert json.loads((tmp_path / "r" / HOLDER).read_text())["pid"] == os.getpid()
    with pytest.raises(HeadlensError, match="in use"):
        FolderLock(tmp_path / "r", wait=0.2).acquire()  # waits, then names the holder
    lock.release()
    FolderLock(tmp_path / "r").acquire().release()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_two_concurrent_runs_leave_one_complete_correct_report(reference, inputs, tmp_path):
    """Two ``headlens report`` processes on one folder at once (the second with --no-resume, which
    used to delete the folder): the second stops at once naming the first; the first writes a
    complete report whose tables equal the reference's; a process holding the lock as a run does,
    SIGKILLed, blocks no later run (the lock dies with its process)."""
    out = tmp_path / "r"
    args = [sys.executable, "-m", "headlens", "report", "--model", str(inputs / "model"), "--task",
            str(inputs / "task.txt"), "--out", str(out), "--no-progress", "--quiet", "--n-examples", "6",
            "--n-bootstrap", "20", "--n-clusters", "2", "--batch-size", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / HOLDER).is_file():
        assert first.poll() is None and time.time() < deadline, "the first run did not start"
        time.sleep(0.05)
    second = subprocess.run(args + ["--no-resume"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"in use by another headlens run (pid {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert headlens.Report.load(out) is not None and tables(out) == tables(reference)
    holder = ("import sys, time; from headlens.storage.folders import FolderLock; "
              "held = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")  # the lock as a run takes it, without the analysis
    fourth = subprocess.Popen([sys.executable, "-c", holder, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert fourth.stdout.readline().strip() == "held"
    with pytest.raises(HeadlensError, match=f"in use by another headlens run \\(pid {fourth.pid}"):
        FolderLock(out).acquire()
    fourth.send_signal(signal.SIGKILL)
    fourth.wait()
    FolderLock(out).acquire().release()  # the lock died with its process


# --- a full disk ---------------------------------------------------------------------------------
def mount_tmpfs(folder: Path, size: int, request) -> None:
    """Mount a tmpfs of ``size`` bytes at ``folder`` (unmounted at the end of the test), or skip."""
    folder.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (it needs root with CAP_SYS_ADMIN): "
                    + res.stderr.decode().strip()[:200])
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))


def disk_use(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_names_the_folder_and_keeps_the_finished_stages(reference, inputs, tmp_path, request):
    """A tmpfs with room for the stages' resume state but not for the report: the run stops with one
    line naming the folder, the finished stages stay; with room again, the same call resumes them all."""
    need, total = disk_use(reference / ".resume") + (64 << 10), disk_use(reference)
    assert total > need + (64 << 10)
    disk = tmp_path / "disk"
    mount_tmpfs(disk, need, request)
    out = disk / "r"
    with pytest.raises(HeadlensError, match=rf"the disk holding '{out}' is full .* the finished stages are kept") as err:
        report(inputs, out)
    assert "\n" not in str(err.value)
    assert sorted(p.stem for p in (out / ".resume").glob("*.json")) == sorted(["run", "attempts"] + STAGES)
    subprocess.run(["mount", "-o", f"remount,size={4 * total}", str(disk)], check=True)
    rep = report(inputs, out)
    assert rep.run["resumed_stages"] == STAGES and tables(out) == tables(reference)


# --- reading a report back -----------------------------------------------------------------------
def test_report_load_checks_the_tables_and_embeds_only_its_own_files(reference, tmp_path, monkeypatch):
    """Issue #20, cases 2 and 8: a truncated ``heads.csv`` is refused; a ``run.json`` naming a file
    outside the folder (absolute, ``..``, or through a link) is refused before anything is read;
    ``Report.load`` of a relative path can add a section."""
    out = copy(reference, tmp_path / "r")
    heads = (out / "heads.csv").read_text().splitlines(keepends=True)
    (out / "heads.csv").write_text("".join(heads[:6]))
    with pytest.raises(HeadlensError, match=r"heads\.csv has 5 rows .* run\.json records 12 rows"):
        headlens.Report.load(out)
    (out / "heads.csv").write_text("".join(heads))
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "link.png").symlink_to(secret)
    run = json.loads((out / "run.json").read_text())
    for path in (str(secret), "../secret.png", "figures/link.png"):
        planted = dict(run, sections=[dict(id="x", title="x", paragraphs=[], notes=[], tables=[],
                                           figures=[dict(name="x", title="x", caption="", path=path)])])
        (out / "run.json").write_text(json.dumps(planted))
        with pytest.raises(HeadlensError, match="outside the report folder|not a path inside"):
            headlens.Report.load(out)
    (out / "run.json").write_text(json.dumps(run))
    monkeypatch.chdir(tmp_path)
    rep = headlens.Report.load("r")
    rep.add_section("A study", paragraphs=["One finding."])
    assert "One finding." in (out / "report.html").read_text() and b"not yours" not in (out / "report.html").read_bytes()
    assert "report.html" in read_checked_json(out / MANIFEST)["files"]

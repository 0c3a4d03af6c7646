"""A report folder that is written atomically and whose long stages resume after a crash.

Layout of ``DIR`` while a run is going::

    DIR/.resume/run.json     fingerprint of the run's configuration
    DIR/.resume/<stage>.pkl  result of every finished stage (and the sweep's own resume state)
    DIR/.resume/attempts.json  start and seconds of every attempt (run) at this report
    DIR/.staging/                 the report being written; moved into DIR at the very end

A finished report has ``run.json`` with ``"status": "complete"`` and ``report.html``; the final
move removes the old ``report.html`` and ``run.json`` first and puts the new ``run.json`` and then
``report.html`` in last, so a folder caught half-way never looks complete.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from headlens.errors import HeadlensError
from headlens.files import atomic_write, writable_folder

STAGING = ".staging"
RESUME_DIR = ".resume"
MARKER = "run.json"
ATTEMPTS = "attempts.json"
PAGE = "report.html"
FLOAT_FORMAT = "%.6g"


def fingerprint(config: dict) -> str:
    """A short hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as sorted, indented JSON through a temporary file and a rename."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` as CSV with a fixed float format and ``\\n`` line ends (byte-stable), and as
    Parquet beside it when pyarrow is importable."""
    atomic_write(path, df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n").encode())
    if importlib.util.find_spec("pyarrow") is not None:
        df.to_parquet(path.with_suffix(".parquet"), index=False)


def is_complete(folder) -> bool:
    """Whether ``folder`` holds a finished headlens report."""
    folder = Path(folder)
    try:
        run = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return run.get("status") == "complete" and (folder / PAGE).is_file()


class ReportFolder:
    """The output folder ``out`` of one run with configuration ``config``.

    ``resume=True`` keeps the stage results a killed run with the same configuration left behind;
    ``force=True`` discards any previous resume state. A finished report already in ``out`` is
    replaced only when the new one is complete.

    Every run at the folder is an attempt; :meth:`elapsed` sums the seconds of all of them since
    the resume state was written (a resumed report's true cost). An attempt's seconds are saved when
    each of its stages finishes and when it fails; one killed outright (SIGKILL, power loss) is
    counted up to the last resume file it wrote (its CPU time up to its last finished stage).
    """

    last = (MARKER, PAGE)  # moved into place last, in this order: their presence means "complete"

    def __init__(self, out, config: dict, resume: bool = True, force: bool = False):
        self.out = Path(out).expanduser().resolve()
        self.key = fingerprint(config)
        self.created = not self.out.exists()
        self.resumed: list[str] = []
        self.seconds: dict = {}
        self.attempts: list[dict] = []
        if self.out.is_dir() and any(self.out.iterdir()) and not self._is_ours():
            raise HeadlensError(f"out folder {str(self.out)!r} is not empty and holds no headlens report; "
                                "choose a new or empty folder")
        writable_folder(self.out, "out folder")
        self.resume = self.out / RESUME_DIR
        self.staging = self.out / STAGING
        self._open_resume(config, resume, force)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        (self.staging / "figures").mkdir()

    def _is_ours(self) -> bool:
        return any((self.out / name).exists() for name in (MARKER, RESUME_DIR, STAGING))

    def _open_resume(self, config: dict, resume: bool, force: bool) -> None:
        stamp = self.resume / MARKER
        if self.resume.is_dir() and stamp.is_file() and not force:
            old = json.loads(stamp.read_text()).get("key")
            if old != self.key and resume:
                raise HeadlensError(
                    f"{self.resume} holds unfinished work of a run with another configuration; "
                    "re-run that command to resume it, or pass force=True (--force) to discard it")
        if force or not resume or not stamp.is_file():
            shutil.rmtree(self.resume, ignore_errors=True)
        self.resume.mkdir(exist_ok=True)
        self.attempts = self._earlier_attempts()
        self.attempts.append(dict(started=time.time(), wall=0.0, cpu=0.0))
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        write_json(stamp, {"key": self.key, "config": config})
        self._save_attempt()

    def _earlier_attempts(self) -> list[dict]:
        """The attempts saved in the resume state; the last one's wall time is extended to the newest
        resume file it wrote (it may have been killed after its last stage, e.g. inside the sweep)."""
        try:
            attempts = json.loads((self.resume / ATTEMPTS).read_text())
        except (OSError, ValueError):
            return []
        if not (isinstance(attempts, list)
                and all(isinstance(a, dict) and {"started", "wall", "cpu"} <= set(a) for a in attempts)):
            return []  # torn or foreign: the earlier attempts' time is unknown
        written = [p.stat().st_mtime for p in self.resume.rglob("*")
                   if p.is_file() and p.name not in (ATTEMPTS, MARKER)]
        if attempts and written:
            last = attempts[-1]
            last["wall"] = round(max(last["wall"], max(written) - last["started"]), 3)
        return attempts

    def _save_attempt(self) -> None:
        """Write this attempt's seconds so far into ``attempts.json``."""
        self.attempts[-1].update(wall=round(time.perf_counter() - self._wall0, 3),
                                 cpu=round(time.process_time() - self._cpu0, 3))
        write_json(self.resume / ATTEMPTS, self.attempts)

    def elapsed(self) -> dict:
        """Seconds of all attempts together, this one up to now: ``wall``, ``cpu``, ``attempts``."""
        self._save_attempt()
        return dict(wall=round(sum(a["wall"] for a in self.attempts), 3),
                    cpu=round(sum(a["cpu"] for a in self.attempts), 3), attempts=len(self.attempts))

    def stage(self, name: str, compute: Callable[[], object]):
        """Return the result of stage ``name``: from its saved result when a previous run of the same
        configuration finished it, else ``compute()`` (saved before it is returned). The seconds
        the computation took (wall, CPU) are kept in :attr:`seconds`, also for resumed stages."""
        path = self.resume / f"{name}.pkl"
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    saved = pickle.load(f)
                self.resumed.append(name)
                self.seconds[name] = saved["seconds"]
                self._save_attempt()
                return saved["result"]
            except (OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
                path.unlink()  # a torn or foreign saved result: compute it again
        wall, cpu = time.perf_counter(), time.process_time()
        result = compute()
        self.seconds[name] = dict(wall=round(time.perf_counter() - wall, 3),
                                  cpu=round(time.process_time() - cpu, 3))
        saved = dict(result=result, seconds=self.seconds[name])
        atomic_write(path, pickle.dumps(saved, protocol=pickle.HIGHEST_PROTOCOL))
        self._save_attempt()
        return result

    def sweep_resume_dir(self) -> Path:
        """Folder for the ablation sweep's own per-head resume state."""
        path = self.resume / "sweep"
        path.mkdir(exist_ok=True)
        return path

    def publish(self, keep_resume: bool = False) -> None:
        """Move the staged report into the folder: everything else, then the files of :attr:`last`
        (``run.json``, then ``report.html``). Removes the resume state unless ``keep_resume``."""
        staged = sorted(p.name for p in self.staging.iterdir())
        for name in reversed(self.last):
            (self.out / name).unlink(missing_ok=True)
        for name in staged:
            if name in self.last:
                continue
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(self.staging / name, target)
        for name in self.last:
            if (self.staging / name).exists():
                os.replace(self.staging / name, self.out / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        if not keep_resume:
            shutil.rmtree(self.resume, ignore_errors=True)

    def abandon(self) -> None:
        """Drop the half-written staging folder. Saved results of finished stages stay for a resume;
        when no stage finished, nothing of this run is left (nor the folder, if it made it)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.resume.is_dir():
            self._save_attempt()
        if not any(p.name not in (MARKER, ATTEMPTS) for p in self.resume.iterdir()):
            shutil.rmtree(self.resume, ignore_errors=True)
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()

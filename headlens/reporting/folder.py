"""A report folder that is written atomically, by one run at a time, only where headlens may
write, and whose long stages resume after a crash from saved results that cannot run code.

Layout of ``DIR`` while a run is going::

    DIR/.headlens-manifest.json  the files headlens wrote here (headlens.storage.folders.OwnedFolder)
    DIR/.headlens.lock(.json)    the one run writing DIR (headlens.storage.folders.FolderLock)
    DIR/.resume/run.json         the run's options and their fingerprint (checked JSON)
    DIR/.resume/<stage>.json     a finished stage's result (headlens.storage.records: JSON + safetensors
                                 + Parquet, each checksummed), with the digest of its inputs
    DIR/.resume/sweep-<key>/     the ablation sweep's own units (headlens.importance.resume)
    DIR/.resume/attempts.json    start and seconds of every attempt (run) at this report
    DIR/.staging/                the report being written; moved into DIR at the very end

A folder that is not empty and has no manifest is refused; a file headlens did not write is never
replaced or deleted. A saved stage is used only when its files pass their checksums and it was
computed with the same options and the same inputs (the model's weights, the task's examples and
the pattern texts, by content); anything else is computed again (and named in :attr:`damaged` or
:attr:`stale`), never trusted. A finished report has ``run.json`` with ``"status": "complete"``
and ``report.html``; the final move removes the old ``report.html`` and ``run.json`` first and
puts the new ``run.json`` and then ``report.html`` in last, so a folder caught half-way never
looks complete.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from headlens.errors import HeadlensError
from headlens.files import atomic_write, disk_full_error, is_disk_full
from headlens.importance.resume import sweep_dir_damaged
from headlens.storage.folders import FolderLock, OwnedFolder, check_ownable, is_internal
from headlens.storage.records import (
    DamagedRecord,
    load_record,
    read_checked_json,
    remove_record,
    save_record,
    write_checked_json,
)

STAGING = ".staging"
RESUME_DIR = ".resume"
MARKER = "run.json"
ATTEMPTS = "attempts.json"
PAGE = "report.html"
FLOAT_FORMAT = "%.6g"
BY = "report"  # how the manifest names what `headlens report` wrote
TABLES = ("heads", "clusters", "pruning", "distance")
OUTPUTS = [f"{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")] + ["prune_plan.json", "report.md",
                                                                         MARKER, PAGE]


def fingerprint(config: dict) -> str:
    """A short hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def json_bytes(obj) -> bytes:
    """``obj`` as sorted, indented JSON text."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as sorted, indented JSON through a temporary file and a rename."""
    atomic_write(path, json_bytes(obj))


def table_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as CSV with a fixed float format and ``\\n`` line ends (byte-stable)."""
    return df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n").encode()


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` as CSV (:func:`table_bytes`), and as Parquet beside it when pyarrow is importable."""
    atomic_write(path, table_bytes(df))
    if importlib.util.find_spec("pyarrow") is not None:
        atomic_write(path.with_suffix(".parquet"), lambda p: df.to_parquet(p, index=False))


def table_schema(path: Path) -> dict:
    """What ``run.json`` records of a written table, for :func:`check_table`: rows, columns, sha256."""
    data = path.read_bytes()
    header = data.split(b"\n", 1)[0].decode()
    rows = max(data.count(b"\n") - 1, 0)
    return dict(rows=rows, columns=pd.read_csv(path, nrows=0).columns.tolist() if header else [],
                sha256=hashlib.sha256(data).hexdigest())


def check_table(folder: Path, name: str, df: pd.DataFrame, schema: dict) -> None:
    """Refuse a table that is not the one the run wrote (rows, columns, content)."""
    where = f"{folder / name}"
    if len(df) != schema.get("rows") or list(df.columns) != list(schema.get("columns", [])):
        raise HeadlensError(f"{where} has {len(df)} rows and {len(df.columns)} columns, but run.json records "
                            f"{schema.get('rows')} rows and {len(schema.get('columns', []))} columns: the table is "
                            "truncated or was changed; re-run the report")
    if hashlib.sha256((folder / name).read_bytes()).hexdigest() != schema.get("sha256"):
        raise HeadlensError(f"{where} was changed after the report wrote it (its sha256 differs from run.json's); "
                            "re-run the report")


def inside(folder: Path, rel, what: str = "file") -> Path:
    """``folder / rel`` if it is inside ``folder`` (symbolic links resolved), else HeadlensError:
    a report only ever reads and embeds its own files."""
    folder = Path(folder).resolve()
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise HeadlensError(f"{folder / MARKER} names the {what} {rel!r}, which is not a path inside the report")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise HeadlensError(f"{folder / MARKER} names the {what} {rel!r}, which lies outside the report folder "
                            f"{str(folder)!r}: refused")
    return path


def check_report(folder: Path, run, tables: dict) -> dict:
    """Check a finished report's ``run.json`` against its tables (``{"heads": df, ...}``, read from
    its CSV files): every table ``run.json`` lists has its recorded rows, columns and sha256, the
    heads table has one row per head of the model, the clusters table one per cluster; every
    figure and section file it names lies inside the folder. Returns ``{figure name: path}``."""
    if not isinstance(run, dict):
        raise HeadlensError(f"{folder / MARKER} is not a JSON object")
    for name, schema in (run.get("tables") or {}).items():
        stem = name.removesuffix(".csv")
        if stem in tables and isinstance(schema, dict):
            check_table(folder, name, tables[stem], schema)
    heads, n_heads = tables["heads"], (run.get("model") or {}).get("n_heads_total")
    pairs = list(zip(heads["layer"], heads["head"])) if {"layer", "head"} <= set(heads.columns) else []
    if len(set(pairs)) != len(heads) or (isinstance(n_heads, int) and len(heads) != n_heads):
        raise HeadlensError(f"{folder / 'heads.csv'} has {len(heads)} rows for {len(set(pairs))} distinct heads; "
                            f"the model has {n_heads} heads (run.json): the table is truncated or was changed")
    n_clusters = (run.get("results") or {}).get("n_clusters")
    if isinstance(n_clusters, int) and len(tables["clusters"]) != n_clusters:
        raise HeadlensError(f"{folder / 'clusters.csv'} has {len(tables['clusters'])} rows, run.json records "
                            f"{n_clusters} clusters: the table is truncated or was changed")
    figures = {name: inside(folder, rel, "figure") for name, rel in (run.get("figures") or {}).items()}
    for section in run.get("sections") or []:
        if not isinstance(section, dict):
            raise HeadlensError(f"{folder / MARKER}: a section is not a JSON object")
        for t in section.get("tables") or []:
            inside(folder, t.get("file") if isinstance(t, dict) else t, "section table")
        for f in section.get("figures") or []:
            if not isinstance(f, dict):
                raise HeadlensError(f"{folder / MARKER}: a section figure is not a JSON object")
            figures[f.get("name")] = inside(folder, f.get("path"), "section figure")
    return figures


class SectionFiles:
    """Writes files into a finished report (:meth:`file`, :meth:`table`) where headlens may."""

    def __init__(self, owned: OwnedFolder):
        self.owned = owned

    def file(self, rel: str, data) -> Path:
        return self.owned.write(rel, data, BY)

    def table(self, rel: str, df: pd.DataFrame) -> None:
        self.file(rel, table_bytes(df))
        if importlib.util.find_spec("pyarrow") is not None:
            self.file(str(Path(rel).with_suffix(".parquet")), lambda p: df.to_parquet(p, index=False))


@contextmanager
def section_writer(out: Path):
    """``with section_writer(out) as w: w.file(...)``: changes to a finished report, under its
    lock and its manifest (a folder without one is refused)."""
    with FolderLock(out, name="report folder"):
        yield SectionFiles(OwnedFolder(out, "report folder"))


def is_complete(folder) -> bool:
    """Whether ``folder`` holds a finished headlens report."""
    folder = Path(folder)
    try:
        run = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and run.get("status") == "complete" and (folder / PAGE).is_file()


RESULT_CLASSES: dict = {}


def register_result_class(cls) -> type:
    """Allow instances of ``cls`` (an estimator whose state is data: tables, arrays, numbers,
    strings) in saved stage results; used as a class decorator. Reading one back builds it from
    that data only, so only classes of headlens' own belong here."""
    RESULT_CLASSES[cls.__qualname__] = cls
    return cls


class ReportFolder:
    """The output folder ``out`` of one run with configuration ``config``.

    ``resume=True`` keeps the stage results a killed run with the same configuration left behind;
    ``force=True`` discards any previous resume state. A finished report already in ``out`` is
    replaced only when the new one is complete. ``wait``: seconds to wait for another run
    writing ``out`` (then one-line error naming it). Under ``torchrun`` rank 0 alone makes one
    (:class:`headlens.reporting.ranks.RankFolder`); the other ranks never open the folder.

    Every run at the folder is an attempt; :meth:`elapsed` sums the seconds of all of them since
    the resume state was written (a resumed report's true cost). An attempt's seconds are saved when
    each of its stages finishes and when it fails; one killed outright (SIGKILL, power loss) is
    counted up to the last resume file it wrote (its CPU time up to its last finished stage).
    """

    last = (MARKER, PAGE)  # moved into place last, in this order: their presence means "complete"
    by = BY  # the command the manifest says wrote the published files

    def __init__(self, out, config: dict, resume: bool = True, force: bool = False, wait: float = 0):
        self.out = Path(out).expanduser().resolve()
        self.key = fingerprint(config)
        self.created = not self.out.exists()
        self.resumed: list[str] = []
        self.damaged: list[str] = []  # saved files that failed their checksum or schema (recomputed)
        self.stale: list[str] = []  # saved stages of other inputs (recomputed)
        self.seconds: dict = {}
        self.attempts: list[dict] = []
        self.inputs = ""  # the digest of what a stage reads when it does not give its own
        check_ownable(self.out, "out folder")  # before anything is written into it
        self.lock = FolderLock(self.out, wait=wait).acquire()
        self.resume, self.staging = self.out / RESUME_DIR, self.out / STAGING
        try:
            self.owned = OwnedFolder(self.out, "out folder")
            self.owned.check_free(OUTPUTS)
            self.owned.claim([RESUME_DIR, STAGING], self.by, tree=True)
            self._open_resume(config, resume, force)
            shutil.rmtree(self.staging, ignore_errors=True)
            (self.staging / "figures").mkdir(parents=True)
        except BaseException:
            self.lock.release()
            raise

    def _open_resume(self, config: dict, resume: bool, force: bool) -> None:
        stamp = self.resume / MARKER
        old = None
        if stamp.is_file() and not force:
            try:
                old = read_checked_json(stamp).get("key")
            except (DamagedRecord, OSError):
                self.damaged.append(f"{RESUME_DIR}/{MARKER}")  # the stages check their own keys
            if old is not None and old != self.key and resume:
                raise HeadlensError(
                    f"{self.resume} holds unfinished work of a run with another configuration; "
                    "re-run that command to resume it, or pass force=True (--force) to discard it")
        if force or not resume:
            shutil.rmtree(self.resume, ignore_errors=True)
        self.resume.mkdir(exist_ok=True)
        self.attempts = self._earlier_attempts()
        self.attempts.append(dict(started=time.time(), wall=0.0, cpu=0.0))
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        write_checked_json(stamp, {"key": self.key, "config": json.loads(json.dumps(config, default=str))})
        self._save_attempt()

    def _earlier_attempts(self) -> list[dict]:
        """The attempts saved in the resume state; the last one's wall time is extended to the newest
        resume file it wrote (it may have been killed after its last stage, e.g. inside the sweep)."""
        try:
            attempts = read_checked_json(self.resume / ATTEMPTS).get("attempts")
        except FileNotFoundError:
            return []
        except (DamagedRecord, OSError):
            self.damaged.append(f"{RESUME_DIR}/{ATTEMPTS}")
            return []
        if not (isinstance(attempts, list) and all(
                isinstance(a, dict) and {"started", "wall", "cpu"} <= set(a)
                and all(isinstance(a[k], (int, float)) for k in ("started", "wall", "cpu")) for a in attempts)):
            self.damaged.append(f"{RESUME_DIR}/{ATTEMPTS}")
            return []  # foreign: the earlier attempts' time is unknown
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
        write_checked_json(self.resume / ATTEMPTS, {"attempts": self.attempts})

    def elapsed(self) -> dict:
        """Seconds of all attempts together, this one up to now: ``wall``, ``cpu``, ``attempts``."""
        self._save_attempt()
        return dict(wall=round(sum(a["wall"] for a in self.attempts), 3),
                    cpu=round(sum(a["cpu"] for a in self.attempts), 3), attempts=len(self.attempts))

    def stage(self, name: str, compute: Callable[[], object], inputs: str = "", classes: Optional[dict] = None):
        """Return the result of stage ``name``: the saved one when a previous run with the same
        configuration and the same ``inputs`` (a digest of what the stage reads; default
        :attr:`inputs`) finished it and its files pass their checksums, else ``compute()`` (saved
        before it is returned). ``classes``: ``{name: class}`` of objects in the result besides
        the registered ones (:func:`register_result_class`; see :mod:`headlens.storage.records`).
        The seconds the computation took (wall, CPU) are kept in :attr:`seconds`, also for
        resumed stages."""
        inputs, classes = inputs or self.inputs, {**RESULT_CLASSES, **(classes or {})}
        try:
            saved = load_record(self.resume, name, classes)
        except DamagedRecord:
            saved = None
            self.damaged.append(name)
        if saved is not None:
            result, meta = saved
            seconds = meta.get("seconds")
            if (meta.get("key") == self.key and meta.get("inputs") == inputs and isinstance(seconds, dict)
                    and all(isinstance(seconds.get(k), (int, float)) for k in ("wall", "cpu"))):
                self.resumed.append(name)
                self.seconds[name] = seconds
                self._save_attempt()
                return result
            self.stale.append(name)
        remove_record(self.resume, name)
        wall, cpu = time.perf_counter(), time.process_time()
        result = compute()
        self.seconds[name] = dict(wall=round(time.perf_counter() - wall, 3),
                                  cpu=round(time.process_time() - cpu, 3))
        try:
            save_record(self.resume, name, result, dict(key=self.key, inputs=inputs, seconds=self.seconds[name]),
                        classes)
        except TypeError as e:  # a result of a type the records cannot hold: not resumable, still correct
            warnings.warn(f"headlens: stage {name!r} is not saved for resume ({e}); a resumed run computes it again")
        self._save_attempt()
        return result

    def sweep_resume_dir(self, inputs: str = "") -> Path:
        """Folder for the ablation sweep's own per-unit resume state, one per configuration and
        ``inputs``; the folders of other inputs, and a damaged one, are removed."""
        path = self.resume / f"sweep-{fingerprint([self.key, inputs])}"
        for old in self.resume.glob("sweep*"):
            if old.is_dir() and old != path:
                shutil.rmtree(old)
        if sweep_dir_damaged(path):
            self.damaged.append(f"{RESUME_DIR}/{path.name}/sweep.json")
            shutil.rmtree(path)
        path.mkdir(exist_ok=True)
        return path

    def publish(self, keep_resume: bool = False) -> None:
        """Move the staged report into the folder: everything else, then the files of :attr:`last`
        (``run.json``, then ``report.html``); files an earlier report wrote that this one does not
        have are removed (nothing headlens did not write is touched). Removes the resume state unless
        ``keep_resume``. A failure (a foreign file in the way, a full disk) leaves the resume state
        for the next run."""
        try:
            staged = sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file())
            self.owned.check_free(staged)
            self.owned.claim(staged, self.by)
            for name in reversed(self.last):
                (self.out / name).unlink(missing_ok=True)
            for rel in staged:
                if rel in self.last:
                    continue
                (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / rel, self.out / rel)
            self.owned.remove([rel for rel in self.owned.written_by(self.by) if rel not in staged])
            for name in self.last:
                if (self.staging / name).exists():
                    os.replace(self.staging / name, self.out / name)
        except BaseException as e:
            self.abandon()
            if is_disk_full(e):
                raise disk_full_error(self.out, "; the finished stages are kept in .resume/") from None
            raise
        shutil.rmtree(self.staging, ignore_errors=True)
        if not keep_resume:
            shutil.rmtree(self.resume, ignore_errors=True)
        self.lock.release()

    def abandon(self) -> None:
        """Drop the half-written staging folder and release the folder. Saved results of finished
        stages stay for a resume; when no stage finished, nothing of this run is left (nor the
        folder, if it made it)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            if self.resume.is_dir():
                self._save_attempt()
        except (OSError, HeadlensError):
            pass  # e.g. a full disk: the attempt's seconds are lost, the finished stages are not
        if self.resume.is_dir() and not any(p.name not in (MARKER, ATTEMPTS) for p in self.resume.iterdir()):
            shutil.rmtree(self.resume, ignore_errors=True)
        self.lock.release()
        if self.created and self.out.is_dir() and all(is_internal(p.name) for p in self.out.iterdir()):
            for p in self.out.iterdir():
                p.unlink(missing_ok=True)
            self.out.rmdir()

"""The finished report: :class:`Report` (its tables, pruning plan, figures and ``run.json``),
read back from its folder with :meth:`Report.load`, extended with :meth:`Report.add_section`, and
:func:`write_report_files`, which writes one into a report folder's staging area. Made by
:func:`headlens.reporting.pipeline.report`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from headlens.errors import HeadlensError, check
from headlens.pruning.plans import PLAN_FILE, plan_record, read_plan, write_plan
from headlens.reporting import render
from headlens.reporting.folder import (
    TABLES,
    check_report,
    is_complete,
    json_bytes,
    section_writer,
    table_schema,
    write_json,
    write_table,
)
from headlens.reporting.latex import write_latex, write_report_tables


@dataclass
class Report:
    """A finished report.

    heads: one row per head (``layer, head, role, pattern_class, cluster, importance,
    importance_se, importance_ci_low, importance_ci_high, grad_importance, score_*``);
    clusters: one row per cluster; pruning: the pruning curve (one row per method, seed and step);
    plan: the recommended plan ``{layer: [heads]}`` (give it, or ``prune_plan.json``, to
    :func:`headlens.pruning.physical.prune_heads`); plan_record: ``prune_plan.json`` (every
    method's plan, see :mod:`headlens.pruning.plans`); figures: name -> PNG path; run: ``run.json``
    (configuration, versions, timings, results; ``timings_s["total"]`` sums every attempt of a
    resumed run, listed in ``attempts``, and ``resumed_stages`` names the stages an earlier
    attempt computed); distance: the head x head Jensen-Shannon
    distance (``distance.csv``: column ``head`` then one column per head, ``"layer.head"``).
    """

    out: Path
    heads: pd.DataFrame
    clusters: pd.DataFrame
    pruning: pd.DataFrame
    plan: dict
    figures: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    distance: Optional[pd.DataFrame] = None
    plan_record: dict = field(default_factory=dict)

    @property
    def html(self) -> Path:
        return self.out / "report.html"

    def summary(self) -> str:
        """The text ``headlens report`` prints at the end."""
        return render.summary_text(self)

    def findings(self) -> list[str]:
        return render.findings(self)

    def top_heads(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` heads whose ablation hurts the task most (see :func:`headlens.reporting.render.ranked`)."""
        return render.ranked(self).head(n)

    def add_section(self, title: str, paragraphs=(), notes=(), tables: Optional[dict] = None,
                    figures: Optional[dict] = None) -> None:
        """Append a section of study-specific results to the finished report and re-render it.

        paragraphs: sentences of text; notes: bullet points; tables: ``{title: DataFrame}``
        (saved as ``<section>_<n>.csv``); figures: ``{title: (png_path, caption)}`` (copied into
        ``figures/``, an ``.svg`` beside the PNG too). Stored in ``run.json`` so that
        :meth:`load` and re-rendering keep it; the pages are rewritten atomically.
        """
        import re
        import tempfile

        self.out = Path(self.out).expanduser().resolve()
        check(is_complete(self.out), f"{self.out} is not a complete report")
        sid = "_".join(re.sub(r"[^a-z0-9]+", " ", title.lower()).split()[:3]) or "section"
        section = dict(id=sid, title=title, paragraphs=list(paragraphs), notes=list(notes), tables=[],
                       figures=[])
        with section_writer(self.out) as out, tempfile.TemporaryDirectory() as tmp:
            # the folder's lock held; only files headlens wrote are replaced
            for i, (name, df) in enumerate((tables or {}).items()):
                out.table(f"{sid}_{i}.csv", df)
                out.file(f"tables/{sid}_{i}.tex", write_latex(df, Path(tmp) / f"{sid}_{i}.tex", caption=name).read_bytes())
                text = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
                section["tables"].append(dict(title=name, file=f"{sid}_{i}.csv", text_columns=text))
            for i, (name, (png, caption)) in enumerate((figures or {}).items()):
                stem = f"{sid}_{i}"
                for src in (Path(png), Path(png).with_suffix(".svg"), Path(png).with_suffix(".pdf")):
                    if src.is_file():
                        out.file(f"figures/{stem}{src.suffix}", src.read_bytes())
                self.figures[stem] = self.out / "figures" / f"{stem}.png"
                section["figures"].append(dict(name=stem, title=name, caption=caption, path=f"figures/{stem}.png"))
            self.run["sections"] = [x for x in self.run.get("sections", []) if x["id"] != sid] + [section]
            out.file("report.md", render.render_markdown(self).encode())
            out.file("run.json", json_bytes(self.run))
            out.file("report.html", render.render_html(self).encode())

    def __repr__(self) -> str:
        m = self.run.get("model", {})
        return (f"Report({str(self.out)!r}: {m.get('name', '?')}, {len(self.heads)} heads, "
                f"{len(self.clusters)} clusters, task {self.run.get('data', {}).get('task', '?')})")

    @classmethod
    def load(cls, folder) -> "Report":
        """Read a finished report folder; refuses one a run did not complete."""
        folder = Path(folder).expanduser().resolve()
        check(folder.is_dir(), f"report folder {str(folder)!r} does not exist")
        if not is_complete(folder):
            raise HeadlensError(f"{str(folder)!r} holds no complete headlens report (run.json without "
                                "status 'complete' or report.html missing: the run failed or is "
                                "still going); re-run the same command to resume it")
        run = json.loads((folder / "run.json").read_text())
        text = {"role": str, "pattern_class": str, "members": str, "medoid": str, "description": str,
                "roles": str, "method": str}

        def read(name):
            return pd.read_csv(folder / name, dtype=text, keep_default_na=False, na_values=[""])
        tables = {"heads": read("heads.csv"), "clusters": read("clusters.csv"), "pruning": read("pruning.csv")}
        if (folder / "distance.csv").is_file():
            tables["distance"] = pd.read_csv(folder / "distance.csv", dtype={"head": str})
        figures = check_report(folder, run, tables)  # row counts, schema, paths inside the folder
        record = read_plan(folder / PLAN_FILE)
        return cls(folder, tables["heads"], tables["clusters"], tables["pruning"], record["heads"],
                   figures, run, tables.get("distance"), record)


def write_report_files(rep: Report, folder) -> None:
    """Write every file of ``rep`` into the staging folder of ``folder`` (a
    :class:`headlens.reporting.folder.ReportFolder`; ``report.html`` last)."""
    stage = folder.staging
    write_table(rep.heads, stage / "heads.csv")
    write_table(rep.clusters, stage / "clusters.csv")
    write_table(rep.pruning, stage / "pruning.csv")
    write_plan(stage / PLAN_FILE, rep.plan_record or plan_record(rep.plan))
    if rep.distance is not None:
        write_table(rep.distance, stage / "distance.csv")
    staged = Report(stage, rep.heads, rep.clusters, rep.pruning, rep.plan,
                    {k: stage / Path(v).relative_to(rep.out) for k, v in rep.figures.items()}, rep.run,
                    plan_record=rep.plan_record)
    write_report_tables(staged, stage)
    (stage / "report.md").write_text(render.render_markdown(staged))
    rep.run["tables"] = {f"{t}.csv": table_schema(stage / f"{t}.csv") for t in TABLES if (stage / f"{t}.csv").is_file()}
    write_json(stage / "run.json", rep.run)
    (stage / "report.html").write_text(render.render_html(staged))

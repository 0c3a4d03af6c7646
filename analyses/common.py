"""Helpers shared by the studies in analyses/: the committed copy of a report, and small figures.

Every study is one command (``python analyses/NAME.py``) that writes ``reports/NAME/`` with
:func:`headlens.report` and adds its own section with :meth:`headlens.Report.add_section`.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"


def slim(rep, keep_svg: bool = False) -> None:
    """Keep the committed copy small: drop the SVG (unless ``keep_svg``), PDF and Parquet twins (the
    PNGs, CSVs and LaTeX tables stay; re-running the study writes them all again)."""
    for path in ([] if keep_svg else list(rep.out.glob("figures/*.svg"))) + list(rep.out.glob("figures/*.pdf")) \
            + list(rep.out.glob("*.parquet")):
        path.unlink()


def markdown(df, digits: int) -> str:
    """A pandas table as a GitHub markdown table (floats to ``digits`` decimals)."""
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def finish(rep, started: float) -> None:
    """Slim the report and say where it is and how long the study took."""
    slim(rep)
    size = sum(p.stat().st_size for p in rep.out.rglob("*") if p.is_file()) / 2**20
    where = rep.out.relative_to(ROOT) if rep.out.is_relative_to(ROOT) else rep.out
    print(f"{where}: written in {time.perf_counter() - started:.0f} s "
          f"({size:.1f} MB, load average {os.getloadavg()[0]:.1f})")


def run_study(argv, doc: str, out: Path, make_report: Callable, study: Callable,
              add_arguments: Optional[Callable] = None) -> None:
    """A study's command line. Parses ``argv`` (``--out``, default ``out``; ``--section-only``; and
    what ``add_arguments(parser)`` adds), makes the headlens report with ``make_report(args)`` or,
    with ``--section-only``, loads the finished one from ``--out``; then adds the study's own
    section with ``study(rep, args)`` and finishes (:func:`finish`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out, help="report folder")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--section-only", action="store_true",
                        help="redo only the study section on the finished report (no new headlens report)")
    args = parser.parse_args(argv)

    import headlens

    started = time.perf_counter()
    rep = headlens.Report.load(args.out) if args.section_only else make_report(args)
    study(rep, args)
    finish(rep, started)


def line_figure(table, x: str, columns: dict, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """One line per column of ``table`` against ``x``; ``columns``: {column: label}. Saves a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for col, label in columns.items():
        ax.plot(table[x], table[col], marker="o", ms=4, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    fig.savefig(Path(path).with_suffix(".pdf"))
    return path

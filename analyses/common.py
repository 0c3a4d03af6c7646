"""Helpers shared by the studies in analyses/: the committed copy of a report, and small figures.

Every study is one command (``python analyses/NAME.py``) that writes ``reports/NAME/`` with
:func:`headlens.report` and adds its own section with :meth:`headlens.Report.add_section`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"


def slim(rep) -> None:
    """Keep the committed copy small: drop the SVG and Parquet twins (the PNGs and CSVs stay;
    re-running the study writes them all again)."""
    for path in list(rep.out.glob("figures/*.svg")) + list(rep.out.glob("*.parquet")):
        path.unlink()


def finish(rep, started: float) -> None:
    """Slim the report and say where it is and how long the study took."""
    slim(rep)
    size = sum(p.stat().st_size for p in rep.out.rglob("*") if p.is_file()) / 2**20
    where = rep.out.relative_to(ROOT) if rep.out.is_relative_to(ROOT) else rep.out
    print(f"{where}: written in {time.perf_counter() - started:.0f} s "
          f"({size:.1f} MB, load average {os.getloadavg()[0]:.1f})")


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
    return path

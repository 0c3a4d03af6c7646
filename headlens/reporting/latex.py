"""Paper-ready tables: every table of a report also as a LaTeX ``tabular`` with booktabs rules
(``\\toprule``, ``\\midrule``, ``\\bottomrule``; ``\\usepackage{booktabs}``), beside its CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from headlens.files import atomic_write


def _cell(x, digits: int):
    if isinstance(x, (float, np.floating)):
        return "" if not np.isfinite(x) else f"{float(x):.{digits}g}"
    return x


def latex_table(df: pd.DataFrame, digits: int = 3, caption: str = None, label: str = None) -> str:
    """``df`` as a booktabs ``table`` environment (floats to ``digits`` significant digits, text
    escaped for LaTeX)."""
    shown = df.map(lambda x: _cell(x, digits))
    columns = [str(c) for c in df.columns]
    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    return shown.to_latex(index=False, escape=True, header=columns, column_format=align, caption=caption,
                          label=label, position="htbp" if caption else None)


def write_latex(df: pd.DataFrame, path: Path, caption: str = None, digits: int = 3) -> Path:
    """Write :func:`latex_table` of ``df`` to ``path`` (``.tex``) atomically."""
    path = Path(path)
    label = "tab:" + path.stem.replace("_", "-")
    atomic_write(path, latex_table(df, digits, caption, label if caption else None).encode())
    return path


def write_report_tables(report, folder: Path) -> list[Path]:
    """Every table the report shows (:func:`headlens.reporting.render.report_tables`) as
    ``folder/tables/<title>.tex``."""
    import re

    from headlens.reporting.render import report_tables

    out = Path(folder) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for tables in report_tables(report).values():
        for t in tables:
            stem = "_".join(re.sub(r"[^a-z0-9]+", " ", t["title"].lower()).split())
            paths.append(write_latex(t["df"], out / f"{stem}.tex", caption=t["title"]))
    return paths

"""Numbers in words: how the report's sentences and tables format values (shared by
:mod:`headlens.reporting.render` and :mod:`headlens.reporting.claims`)."""
from __future__ import annotations

import numpy as np

from headlens.model.heads import head_label

head_name = head_label  # "layer.head", the one text form of a head


def num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"


def signed(x, digits: int = 3) -> str:
    s = num(x, digits)
    return s if s.startswith("-") or s == "n/a" else "+" + s


def pvalue(p) -> str:
    """``p = 0.003``, ``p < 1e-4``."""
    if p is None or not np.isfinite(p):
        return "p n/a"
    return "p < 1e-4" if p < 1e-4 else f"p = {p:.2g}"


def interval(low, high, digits: int = 3) -> str:
    return f"[{num(low, digits)}, {num(high, digits)}]"

"""A readable role and a Kovaleva et al. (2019) pattern class for every head, from its scores.

Both are rules over the columns of :func:`headlens.patterns.scores.pattern_scores`, with every threshold a
field of :class:`RoleThresholds` (override any of them as keyword arguments of
:func:`assign_roles`).

Role (column ``role``): among the *targeted* behaviours whose score reaches its threshold, the one
with the largest ``score / threshold`` wins:

================== ====================================== ===================
role               score                                  default threshold
================== ====================================== ===================
induction          score_induction                        0.4
duplicate-token    score_duplicate_token                  0.4
previous-token     score_previous_token                   0.5
next-token         score_next_token                       0.5
self               score_self                             0.5
first-token sink   score_first_token                      0.5
separator          score_separator                        0.5
punctuation        score_punctuation                      0.5
positional (k)     score_peak_offset, |peak_offset| >= 2  0.5
================== ====================================== ===================

If none fires: ``broad`` when score_entropy_norm >= 0.8, ``local`` when score_local (mass within
the score window, ±3 tokens by default) >= 0.8, else ``mixed``.

Pattern class (column ``pattern_class``), with vertical mass ``v = first + separator +
punctuation`` (a few fixed key columns) and diagonal mass ``d = previous + self + next``:

- ``vertical+diagonal``: ``v >= partial`` and ``d >= partial`` and ``v + d >= combined``
  (0.3, 0.3, 0.75; a uniform head over 20 tokens, 15% of them punctuation, already has
  ``v`` about 0.25 and ``d`` about 0.15, so the bar sits above that);
- ``vertical``: ``v >= vertical`` (0.5); ``diagonal``: ``d >= diagonal`` (0.5);
- ``block``: ``score_local - d >= block`` (0.5): mass spread over a local window beyond the ±1
  band. Kovaleva et al.'s blocks are *segments* (the two sentences of a BERT input); on
  single-segment inputs such as the bundled sentences the local window stands in for them;
- ``heterogeneous``: none of these.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import pandas as pd

from headlens.errors import HeadlensError, check


@dataclass(frozen=True)
class RoleThresholds:
    """Thresholds of the role and pattern-class rules (see the module docstring)."""

    induction: float = 0.4
    duplicate_token: float = 0.4
    previous_token: float = 0.5
    next_token: float = 0.5
    self_attention: float = 0.5
    first_token: float = 0.5
    separator: float = 0.5
    punctuation: float = 0.5
    positional: float = 0.5
    broad: float = 0.8
    local: float = 0.8
    vertical: float = 0.5
    diagonal: float = 0.5
    partial: float = 0.3
    combined: float = 0.75
    block: float = 0.5

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise HeadlensError(f"threshold {f.name} must be a positive number, got {value!r}")


# (role label, score column, threshold field): the targeted behaviours, in tie-break order
TARGETED = [
    ("induction", "score_induction", "induction"),
    ("duplicate-token", "score_duplicate_token", "duplicate_token"),
    ("previous-token", "score_previous_token", "previous_token"),
    ("next-token", "score_next_token", "next_token"),
    ("self", "score_self", "self_attention"),
    ("first-token sink", "score_first_token", "first_token"),
    ("separator", "score_separator", "separator"),
    ("punctuation", "score_punctuation", "punctuation"),
]
REQUIRED = ["layer", "head", "score_previous_token", "score_next_token", "score_self",
            "score_first_token", "score_separator", "score_punctuation", "score_entropy_norm",
            "score_local"]


def make_thresholds(thresholds: Optional[RoleThresholds] = None, **overrides) -> RoleThresholds:
    base = thresholds or RoleThresholds()
    known = {f.name for f in fields(RoleThresholds)}
    unknown = set(overrides) - known
    if unknown:
        raise HeadlensError(f"unknown thresholds {sorted(unknown)}; known: {sorted(known)}")
    return replace(base, **overrides)


def _column(scores: pd.DataFrame, name: str) -> np.ndarray:
    if name not in scores:
        return np.full(len(scores), np.nan)
    return scores[name].to_numpy(dtype=float)


def head_roles(scores: pd.DataFrame, t: RoleThresholds) -> list[str]:
    """The role label of every row of ``scores``."""
    ratios, labels = [], []
    for label, column, field in TARGETED:
        value = _column(scores, column)
        ratios.append(np.where(value >= getattr(t, field), value / getattr(t, field), -np.inf))
        labels.append([label] * len(scores))
    peak = _column(scores, "score_peak_offset")
    offset = _column(scores, "peak_offset")
    positional = (peak >= t.positional) & (np.abs(np.nan_to_num(offset)) >= 2)
    ratios.append(np.where(positional, peak / t.positional, -np.inf))
    labels.append([f"positional ({int(k):+d})" if np.isfinite(k) else "positional" for k in offset])
    ratios = np.stack(ratios)  # [behaviours, heads]
    best = ratios.argmax(0)
    broad = _column(scores, "score_entropy_norm") >= t.broad
    local = _column(scores, "score_local") >= t.local
    roles = []
    for row in range(len(scores)):
        if np.isfinite(ratios[best[row], row]):
            roles.append(labels[best[row]][row])
        else:
            roles.append("broad" if broad[row] else "local" if local[row] else "mixed")
    return roles


def pattern_classes(scores: pd.DataFrame, t: RoleThresholds) -> list[str]:
    """The Kovaleva et al. class of every row of ``scores``."""
    filled = lambda name: np.nan_to_num(_column(scores, name))  # noqa: E731
    v = filled("score_first_token") + filled("score_separator") + filled("score_punctuation")
    d = filled("score_previous_token") + filled("score_self") + filled("score_next_token")
    beyond = filled("score_local") - d
    out = np.full(len(scores), "heterogeneous", dtype=object)
    out[beyond >= t.block] = "block"
    out[d >= t.diagonal] = "diagonal"
    out[v >= t.vertical] = "vertical"
    both = (v >= t.partial) & (d >= t.partial) & (v + d >= t.combined)
    out[both] = "vertical+diagonal"
    return list(out)


def assign_roles(scores: pd.DataFrame, thresholds: Optional[RoleThresholds] = None, **overrides) -> pd.DataFrame:
    """A copy of ``scores`` (from :func:`headlens.patterns.scores.pattern_scores`) with ``role`` and
    ``pattern_class`` columns. Thresholds: a :class:`RoleThresholds`, and/or any of its fields as
    keyword arguments (e.g. ``assign_roles(scores, previous_token=0.7)``)."""
    check(isinstance(scores, pd.DataFrame), f"scores must be a DataFrame, got {type(scores).__name__}")
    missing = [c for c in REQUIRED if c not in scores]
    check(not missing, f"scores lacks columns {missing} (use headlens.patterns.scores.pattern_scores)")
    check(len(scores) > 0, "scores is empty: no heads to label")
    t = make_thresholds(thresholds, **overrides)
    out = scores.copy()
    out["role"] = head_roles(out, t)
    out["pattern_class"] = pattern_classes(out, t)
    return out

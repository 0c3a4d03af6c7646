"""The main job: one call from a model to a research report on its attention heads.

Owns: :mod:`~headlens.reporting.pipeline` (the stages, in order), :mod:`~headlens.reporting.result`
(the finished :class:`Report`: its tables, plan, figures, ``run.json``; load and add a section),
:mod:`~headlens.reporting.folder` (a report folder written atomically, with resume state),
:mod:`~headlens.reporting.run_record` (``run.json``), :mod:`~headlens.reporting.evidence` (what the
claims rest on: test settings, controls, power, the reproducibility record), :mod:`~headlens.reporting.claims`
(the statistical sentences), :mod:`~headlens.reporting.words` (number formatting),
:mod:`~headlens.reporting.render` (findings, HTML and Markdown), :mod:`~headlens.reporting.latex` (booktabs
tables), :mod:`~headlens.reporting.figures` and ``templates/``.
May import every earlier stage (:mod:`headlens.model`, :mod:`headlens.io`, :mod:`headlens.patterns`,
:mod:`headlens.importance`, :mod:`headlens.pruning`); nothing but :mod:`headlens.cli` imports it.
Public names: ``report``, ``Report``.
"""
from headlens.reporting.pipeline import report
from headlens.reporting.result import Report

__all__ = ["report", "Report"]

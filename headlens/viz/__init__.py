"""Looking at attention: an interactive per-head pattern viewer that works offline.

Owns: :mod:`~headlens.viz.data` (one text's patterns, every head, rounded and packed for a page,
with the token cap and the page-size budget) and :mod:`~headlens.viz.view`
(:class:`~headlens.viz.view.AttentionView`: the view as an HTML fragment for a notebook
(``_repr_html_``) or the report, or as a standalone ``.html`` page). The page's script and style
(``static/``) are inlined into every view: nothing is loaded from the web.
May import: :mod:`headlens.model`, :mod:`headlens.patterns`, :mod:`headlens.errors`,
:mod:`headlens.files`. Not :mod:`headlens.io` (give it a loaded model) or any later stage;
:mod:`headlens.reporting` uses it for the report's viewer section.
Public names: ``attention``, ``AttentionView``.
"""
from headlens.viz.view import AttentionView, attention

__all__ = ["attention", "AttentionView"]

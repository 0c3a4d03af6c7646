"""The report's attention-viewer section: :mod:`headlens.viz` on the pattern gallery's text.

:func:`add_view` (a pipeline step) writes the view's payload to ``attention_view.json`` in the
report folder and names it in ``run.json``; :func:`insert_section` (rendering) reads it back, so a
report loaded with :meth:`headlens.reporting.pipeline.Report.load` renders the same viewer.
"""
from __future__ import annotations

import json
from pathlib import Path

from headlens.files import atomic_write
from headlens.viz.data import view_data
from headlens.viz.view import AttentionView

VIEW_FILE = "attention_view.json"
MAX_TOKENS = 64
MAX_BYTES = 750_000  # packed pattern values in the page (about 1 MB once base64-encoded)
TITLE = "Attention viewer"
TEXT = ("Every head's attention pattern on the text of the pattern gallery, to explore in the page: "
        "choose a layer and head (menus, thumbnails or arrow keys), hover a token to see what it "
        "attends to and what attends to it (click to pin it), hover the matrix for one weight (in report.html). "
        "Weights are rounded to {digits} decimals; the head's role is shown beside it. "
        "The same view in a notebook: headlens.viz.attention(model, text).")


def add_view(run: dict, model, text, heads, folder) -> None:
    """Write the viewer's payload for ``text`` into ``folder`` and record it in ``run``.
    ``heads``: the report's per-head table (its ``role`` is shown beside each head)."""
    notes = {(int(r.layer), int(r.head)): str(r.role) for r in heads.itertuples()} if "role" in heads else {}
    data = view_data(model, text, max_tokens=MAX_TOKENS, max_bytes=MAX_BYTES, head_notes=notes)
    atomic_write(Path(folder) / VIEW_FILE, json.dumps(data, separators=(",", ":")).encode())
    run["attention_view"] = VIEW_FILE
    if VIEW_FILE not in run.setdefault("files", []):
        run["files"].insert(max(len(run["files"]) - 3, 0), VIEW_FILE)


def insert_section(sections: list, report) -> list:
    """``sections`` with the viewer's section after the patterns section (unchanged when the
    report has no viewer, e.g. one written before it existed). A cut text's note is in the view."""
    name = report.run.get("attention_view")
    if not name or not (Path(report.out) / name).is_file():
        return sections
    data = json.loads((Path(report.out) / name).read_text())
    section = dict(id="viewer", title=TITLE, text=TEXT.format(digits=data["digits"]),
                   notes=[], tables=[], figures=[],
                   html=AttentionView(data).html())
    at = next((i + 1 for i, s in enumerate(sections) if s["id"] == "patterns"), len(sections))
    return sections[:at] + [section] + sections[at:]

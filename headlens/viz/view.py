"""The attention viewer as HTML: a fragment for a notebook cell or the report, or a standalone page.

A view is one ``<div class="hl-attn">`` holding its payload (see :mod:`headlens.viz.data`) as
JSON, followed by the viewer's style and script, both inlined from ``static/`` (no URL, no
fetch: it works offline, from a file, in a notebook, in an e-mailed report). The script turns
every not-yet-built ``div.hl-attn`` of the page into a viewer, so several views share a page.
"""
from __future__ import annotations

import html
import json
import uuid
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence

from headlens.files import atomic_write
from headlens.viz.data import Text, unpack, view_data


def _static(name: str) -> str:
    return resources.files("headlens.viz").joinpath("static", name).read_text(encoding="utf-8")


def _json_for_script(data: dict) -> str:
    """``data`` as JSON that cannot end its ``<script>`` element early."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class AttentionView:
    """An interactive per-head attention view (see :func:`attention`).

    ``data``: the payload of :func:`headlens.viz.data.view_data`. In a notebook the object shows
    itself (``_repr_html_``); :meth:`save` writes a standalone page; :attr:`patterns` holds the
    rounded numbers it shows, ``[n_heads, T, T]`` in :attr:`heads` order.
    """

    def __init__(self, data: dict):
        self.data = data

    @property
    def tokens(self) -> list[str]:
        return list(self.data["tokens"])

    @property
    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the shown heads, in the order of :attr:`patterns`."""
        return [(layer, h) for layer, hs in self.data["layers"] for h in hs]

    @property
    def patterns(self):
        return unpack(self.data)

    def html(self) -> str:
        """The view as an HTML fragment: its container, payload, style and script."""
        uid = "hl-attn-" + uuid.uuid4().hex[:12]
        return (f'<div class="hl-attn" id="{uid}"><script type="application/json" class="hl-attn-data">'
                f'{_json_for_script(self.data)}</script>'
                '<noscript>The attention viewer needs JavaScript.</noscript></div>\n'
                f'<style>{_static("attention.css")}</style>\n<script>{_static("attention.js")}</script>\n')

    def _repr_html_(self) -> str:
        return self.html()

    def page(self) -> str:
        """A standalone HTML page holding the view."""
        title = html.escape(f"Attention: {self.data['title']}")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n</head>\n'
                '<body style="font-family: -apple-system, \'Segoe UI\', Helvetica, Arial, sans-serif; '
                f'margin: 1.5rem;">\n{self.html()}</body>\n</html>\n')

    def save(self, path) -> Path:
        """Write the standalone page to ``path`` (atomically); returns the path."""
        path = Path(path).expanduser()
        atomic_write(path, self.page().encode("utf-8"))
        return path

    def __repr__(self) -> str:
        return (f"AttentionView({self.data['title']!r}: {len(self.heads)} heads, {len(self.tokens)} tokens"
                + (", cut" if self.data.get("note") else "") + ")")


def attention(model, text: Text, layers: Optional[Sequence[int]] = None, max_tokens: int = 64,
              max_bytes: int = 1_500_000, digits: int = 3, head_notes: Optional[Mapping[tuple, str]] = None,
              title: Optional[str] = None) -> AttentionView:
    """An interactive view of every head's attention pattern on ``text``.

    Choose the layer and head (menus, the thumbnail grid or the arrow keys), hover a token to see
    what it attends to and what attends to it (click to pin it), hover the pattern matrix for
    one query-key weight. model: a loaded :class:`~headlens.HeadlensModel`; text: one string (or
    one sequence of token ids); the other arguments as in :func:`headlens.viz.data.view_data`
    (at most ``max_tokens`` tokens, rounded to ``digits`` decimals). In a notebook the returned
    object displays itself; ``.save("attention.html")`` writes a standalone page.
    """
    return AttentionView(view_data(model, text, layers=layers, max_tokens=max_tokens, max_bytes=max_bytes,
                                   digits=digits, head_notes=head_notes, title=title))

"""The attention viewer's page size and speed: headlens.viz.attention on real prose with the
bundled models, and made-up payloads of many heads or many tokens, opened in headless Chromium.

For each case: tokens shown, heads, packed bytes (before base64), the standalone page's size,
the seconds Python takes to build the view, and in the browser (median over repeats inside one
page load) the milliseconds to build the viewer, to answer a token hover and to switch head.

    python benchmarks/viewer.py                       # minilm + made-up payloads
    python benchmarks/viewer.py --models minilm smollm2
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
TIMER = """<script>
var __t1 = performance.now(), v = document.querySelector("div.hl-attn"), hover = [], swap = [];
var toks = v.querySelectorAll(".hl-from .hl-tok");
for (var i = 0; i < 21; i++) { var t = performance.now();
  toks[(7 * i) % toks.length].dispatchEvent(new MouseEvent("mouseover", {bubbles: true})); hover.push(performance.now() - t); }
for (var i = 0; i < 11; i++) { var t = performance.now(); v.querySelector(".hl-next").click(); swap.push(performance.now() - t); }
var med = function (a) { a.sort(function (x, y) { return x - y; }); return a[a.length >> 1]; };
var p = document.createElement("pre"); p.id = "bench";
p.textContent = JSON.stringify({build_ms: __t1 - __t0, hover_ms: med(hover), switch_ms: med(swap)});
document.body.appendChild(p);
</script>"""


def made_up(n_layers: int, n_heads: int, T: int, causal: bool) -> dict:
    """A payload of random weights (the browser's work does not depend on the values)."""
    n = T * (T + 1) // 2 if causal else T * T
    values = np.random.default_rng(0).integers(0, 1001, size=n_layers * n_heads * n).astype("<u2")
    return dict(format=1, title=f"made up, {n_layers} x {n_heads} heads", causal=causal, sliding_window=None,
                tokens=[f" t{i}" for i in range(T)], n_text_tokens=T, note="",
                layers=[[layer, list(range(n_heads))] for layer in range(n_layers)], kv_group_size=None,
                digits=3, width=2, values=base64.b64encode(values.tobytes()).decode(), head_notes={})


def in_browser(page: str, chromium: str) -> dict:
    page = page.replace('<div class="hl-attn"', '<script>var __t0 = performance.now();</script><div class="hl-attn"', 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "view.html"
        path.write_text(page.replace("</body>", TIMER + "</body>", 1))
        out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}/p",
                              "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
                             capture_output=True, text=True, timeout=300).stdout
    return json.loads(re.search(r'<pre id="bench">(.*?)</pre>', out, re.S).group(1).replace("&quot;", '"'))


def row(name: str, view, seconds: float, chromium) -> dict:
    page = view.page()
    out = dict(case=name, tokens=len(view.tokens), heads=len(view.heads),
               packed_bytes=len(base64.b64decode(view.data["values"])), page_bytes=len(page.encode()),
               python_s=round(seconds, 3), note=view.data["note"])
    if chromium:
        out.update({k: round(v, 1) for k, v in in_browser(page, chromium).items()})
    return out


def main() -> None:
    import headlens
    from headlens.reporting.viewer import MAX_BYTES, MAX_TOKENS
    from headlens.viz import AttentionView, attention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["minilm"], help="bundled models to view real prose with")
    ap.add_argument("--out", default=str(RESULTS / "viewer.json"))
    args = ap.parse_args()
    from pydoc_data.topics import topics

    text = topics["if"] + topics["while"]
    chromium = shutil.which("chromium")
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models:
        model = headlens.load(name)
        for label, kwargs in (("notebook defaults", {}), ("report section", dict(max_tokens=MAX_TOKENS,
                                                                                  max_bytes=MAX_BYTES)),
                              ("256 tokens", dict(max_tokens=256, max_bytes=10**9))):
            t = time.perf_counter()
            view = attention(model, text, **kwargs)
            rows.append(row(f"{name}, {label}", view, time.perf_counter() - t, chromium))
            print(rows[-1], flush=True)
    for L, H, T, causal in ((30, 9, 64, True), (32, 32, 32, True), (6, 12, 256, False)):
        rows.append(row(f"made up {L} x {H} heads, {T} tokens", AttentionView(made_up(L, H, T, causal)), 0.0, chromium))
        print(rows[-1], flush=True)
    result = dict(rows=rows, chromium=bool(chromium), machine=platform.platform(), cpus=os.cpu_count(),
                  load_average=[load_before, os.getloadavg()[0]], created=time.strftime("%Y-%m-%d"))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'case':<42}{'tokens':>7}{'heads':>6}{'page MB':>9}{'python s':>9}{'build ms':>9}{'hover ms':>9}"
          f"{'switch ms':>10}")
    for r in rows:
        print(f"{r['case']:<42}{r['tokens']:>7}{r['heads']:>6}{r['page_bytes'] / 1e6:>9.2f}{r['python_s']:>9.2f}"
              f"{r.get('build_ms', float('nan')):>9.0f}{r.get('hover_ms', float('nan')):>9.1f}"
              f"{r.get('switch_ms', float('nan')):>10.1f}")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; written {args.out}")


if __name__ == "__main__":
    main()

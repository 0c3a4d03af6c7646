"""report.html in a real browser: headless Chromium (Debian's ``chromium``) loads the page, every
figure decodes (naturalWidth > 0), no script raises, and the tables sort on a header click.

A probe script is injected into a copy of the page; it writes its findings into the DOM, which
``--dump-dom`` prints. Skipped when ``chromium`` is not installed (``scripts/setup.sh --test``
installs it with apt-get)."""
import json
import re
import shutil
import subprocess

import pytest
from test_report import fake_report, tiny_folder, tiny_report, tiny_run  # noqa: F401, F811 (fixtures)

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run "
                                "'apt-get install -y chromium' (scripts/setup.sh --test does)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PROBE_HEAD = ('<script>window.__errors = []; window.__failed = []; window.addEventListener("error", '
              'function (e) { if (e instanceof ErrorEvent) window.__errors.push(e.message); '
              'else window.__failed.push(e.target && e.target.tagName); }, true);</script>')
PROBE_TAIL = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var table = document.querySelector("table.sortable"), sorted = null;
  if (table) {
    var th = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var col = th.findIndex(function (c) { return c.textContent === "layer"; });
    th[col].click(); th[col].click();  /* second click: descending */
    sorted = Array.prototype.map.call(table.tBodies[0].rows, function (r) { return +r.cells[col].textContent; });
  }
  var out = document.createElement("pre");
  out.id = "headlens-probe";
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
    errors: window.__errors, failed_resources: window.__failed, tables: document.querySelectorAll("table.sortable").length,
    sorted_layer_desc: sorted, viewers: document.querySelectorAll("div.hl-attn[data-built]").length, external: Array.prototype.filter.call(document.querySelectorAll("[src],[href]"),
      function (e) { return /^(https?:)?\\/\\//.test(e.getAttribute("src") || e.getAttribute("href")); }).length});
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path, *args) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def probe(page, tmp_path) -> dict:
    """Load ``page`` (a report.html path) with the probe injected; return what the probe saw."""
    html = page.read_text()
    copy = tmp_path / "probe.html"
    copy.write_text(html.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", copy.as_uri())
    found = re.search(r'<pre id="headlens-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_page_loads_with_every_figure(tmp_path):
    rep = fake_report(tmp_path / "r")
    seen = probe(rep.html, tmp_path)
    assert seen["images"] == len(rep.figures) == 4
    assert seen["broken"] == [] and seen["errors"] == [] and seen["failed_resources"] == []
    assert seen["external"] == 0
    assert seen["tables"] == 4
    assert seen["sorted_layer_desc"] == sorted(seen["sorted_layer_desc"], reverse=True)
    shot = tmp_path / "page.png"
    chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}", rep.html.as_uri())
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_probe_catches_a_broken_figure_and_a_script_error(tmp_path):
    rep = fake_report(tmp_path / "r")
    html = rep.html.read_text()
    html = re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', html, count=1)
    html = html.replace("</main>", "<script>undefinedFunction();</script></main>", 1)
    rep.html.write_text(html)
    seen = probe(rep.html, tmp_path)
    assert len(seen["broken"]) == 1 and seen["failed_resources"] == ["IMG"]
    assert seen["errors"] == ["Uncaught ReferenceError: undefinedFunction is not defined"]


@pytest.mark.slow
def test_a_real_report_page_loads_with_every_figure(tiny_report, tmp_path):
    """The page of a real run (tiny GPT-2 through the whole pipeline): all its figures decode."""
    seen = probe(tiny_report.html, tmp_path)
    assert seen["images"] == len(tiny_report.figures) >= 10
    assert seen["viewers"] == 1  # the attention viewer section (tests/test_viewer.py drives it)
    assert seen["broken"] == [] and seen["errors"] == [] and seen["failed_resources"] == [] and seen["external"] == 0

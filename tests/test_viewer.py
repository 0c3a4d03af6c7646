"""headlens.viz: the offline attention viewer, checked against transformers' own attention weights
(eager) and against heads whose role is known (planted), then driven in headless Chromium.

The browser tests inject a probe that replays a list of actions (hover or click a token, choose a
layer or head, click a thumbnail, hover a matrix cell, press a key) and snapshots what the view
shows after each; ``--dump-dom`` returns the snapshots. One page holds several notebook-style
fragments (``_repr_html_``) side by side, one of them corrupted on purpose (the probe must see
its error, and the others must still work)."""
import base64
import json
import re

import numpy as np
import pytest
import torch
from test_report import fake_report
from test_report_browser import CHROMIUM, PROBE_HEAD, chromium

import headlens
from headlens.errors import HeadlensError
from headlens.model.tokens import encode, repeated_random_tokens
from headlens.reporting import render
from headlens.reporting.pipeline import Report
from headlens.reporting.viewer import MAX_BYTES, MAX_TOKENS, VIEW_FILE, add_view
from headlens.synthetic import planted_model
from headlens.viz import AttentionView, attention

pytestmark = pytest.mark.usefixtures("one_thread")
ROUNDING = 0.5e-3 + 1e-6  # 3 decimals
TEXT = "The cat sat on the mat because it was tired, and the dog watched it from the door."
ROLES = {(0, 0): "previous", (0, 1): "first", (1, 2): "induction", (1, 3): "duplicate"}
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run "
                                    "'apt-get install -y chromium' (scripts/setup.sh --test does)")


@pytest.fixture(scope="module")
def planted():
    """Known heads (0.0 previous token, 0.1 first token, 1.2 induction, 1.3 duplicate) on
    ``x x`` with 8 random tokens x: no tokenizer, so the view labels tokens by id."""
    return planted_model(ROLES, n_layers=2, n_heads=4, vocab_size=32, n_ctx=32), \
        repeated_random_tokens(1, 8, 32, seed=5)[0]  # x has no repeated token


@pytest.fixture(scope="module")
def bert_hf(bert_tokenizer):
    """A random BERT encoder with spread-out weights (peaked, head-specific patterns), eager attention."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                     vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=64, initializer_range=0.3,
                     attn_implementation="eager")
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bert(bert_hf, bert_tokenizer):
    return headlens.from_hf_model(bert_hf, bert_tokenizer)


@pytest.fixture(scope="module")
def mistral_hf(bert_tokenizer):
    """A random Mistral decoder: grouped-query attention (6 heads over 2 kv heads) and a sliding
    window of 4 positions, shorter than the text."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    tok = bert_tokenizer
    cfg = MistralConfig(vocab_size=tok.vocab_size, hidden_size=36, intermediate_size=44, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=4,
                        max_position_embeddings=64, initializer_range=0.3, bos_token_id=tok.cls_token_id,
                        eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, attn_implementation="eager")
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mistral(mistral_hf, bert_tokenizer):
    return headlens.from_hf_model(mistral_hf, bert_tokenizer)


def hf_patterns(hf, ids) -> np.ndarray:
    """transformers' attention weights ``[L * H, P, P]`` for one sequence of ids."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    return torch.cat([a[0] for a in out.attentions]).numpy()


def ids_of(model, text) -> list:
    return encode(model, text)["input_ids"][0].tolist()


# --- the payload ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["decoder", "encoder", "sliding window"])
def test_view_numbers_equal_transformers_attention(kind, tiny_gpt2, tiny_gpt2_hf, bert, bert_hf, mistral, mistral_hf,
                                                   bert_tokenizer):
    model, hf = dict(decoder=(tiny_gpt2, tiny_gpt2_hf), encoder=(bert, bert_hf),
                     **{"sliding window": (mistral, mistral_hf)})[kind]
    view = attention(model, TEXT)
    ids = ids_of(model, TEXT)
    ref = hf_patterns(hf, ids)
    assert view.heads == model.head_labels() and view.patterns.shape == ref.shape
    assert np.abs(view.patterns - ref).max() <= ROUNDING
    assert view.tokens == [bert_tokenizer.decode([i]) for i in ids]
    assert view.data["causal"] is (kind != "encoder") and view.data["note"] == ""
    assert view.data["sliding_window"] == (4 if kind == "sliding window" else None)


def test_a_cut_text_is_what_the_model_ran_on(bert, bert_hf):
    long = " ".join([TEXT] * 2)
    view = attention(bert, long, max_tokens=12)
    ids = ids_of(bert, long)
    assert len(view.tokens) == 12
    assert np.abs(view.patterns - hf_patterns(bert_hf, ids[:12])).max() <= ROUNDING  # not the long text's rows
    assert view.data["note"] == (f"Showing the first 12 of the text's {len(ids)} tokens, cut by max_tokens=12; "
                                 "the model was run on these 12 tokens alone.")
    assert np.allclose(view.patterns.sum(-1), 1, atol=12 * ROUNDING)


def test_page_budget_digits_and_layers(tiny_gpt2, tiny_gpt2_hf):
    full = attention(tiny_gpt2, TEXT)
    P = len(full.tokens)
    small = attention(tiny_gpt2, TEXT, digits=2, layers=[2, 0], max_bytes=8 * 11 * 12 // 2,
                      head_notes={(0, 1): "previous-token", (1, 1): "not shown"})
    assert small.heads == [(0, h) for h in range(4)] + [(2, h) for h in range(4)]
    assert len(small.tokens) == 11 < P and "the page-size budget" in small.data["note"]
    assert small.data["width"] == 1 and len(base64.b64decode(small.data["values"])) == 8 * 11 * 12 // 2
    ref = hf_patterns(tiny_gpt2_hf, ids_of(tiny_gpt2, TEXT)[:11])[[0, 1, 2, 3, 8, 9, 10, 11]]
    assert np.abs(small.patterns - ref).max() <= 0.5e-2 + 1e-6
    assert small.data["head_notes"] == {"0.1": "previous-token"}


def test_planted_heads_show_their_role(planted):
    model, ids = planted
    view = attention(model, ids)
    p = view.patterns
    assert view.tokens == [str(i) for i in ids.tolist()]
    i = np.arange(1, 16)
    assert (p[0][i, i - 1] > 0.999).all()                     # 0.0 previous token
    assert (p[1][:, 0] > 0.999).all()                         # 0.1 first token
    # 1.2 induction: the token after the earlier copy (query 8 also matches key 0, whose previous-token
    # head attends to itself, having no previous token)
    assert (p[6][np.arange(9, 16), np.arange(2, 9)] > 0.999).all()


@pytest.mark.parametrize("call, message", [
    (lambda m, ids: attention("minilm", "x"), "loaded HeadlensModel"),
    (lambda m, ids: attention(m, "text"), "no tokenizer"),
    (lambda m, ids: attention(m, [ids.tolist(), ids.tolist()]), "one string or one sequence"),
    (lambda m, ids: attention(m, ids[None].repeat(2, 1)), "one token sequence"),
    (lambda m, ids: attention(m, ids, layers=[2]), r"ints in \[0, 2\)"),
    (lambda m, ids: attention(m, ids, digits=6), "digits"),
    (lambda m, ids: attention(m, ids, max_tokens=1), "max_tokens"),
    (lambda m, ids: attention(m, ids, max_bytes=10), "does not hold even 2 tokens"),
    (lambda m, ids: attention(m, [99]), r"token ids must lie in \[0, 32\)"),
])
def test_bad_input_is_refused(planted, call, message):
    with pytest.raises(HeadlensError, match=message):
        call(*planted)


def test_fragment_and_page_are_self_contained(tiny_gpt2, tmp_path):
    view = attention(tiny_gpt2, TEXT, title="</script><script>alert(1)</script> & <b>")
    frag = view._repr_html_()
    assert frag.count("</script>") == 2 and "<b>" not in frag  # the payload cannot end its element
    page = view.save(tmp_path / "view.html").read_text()
    for html in (frag, page):
        found = re.findall(r'<div class="hl-attn" id="[^"]+"><script type="application/json" '
                           r'class="hl-attn-data">(.*?)</script>', html, re.S)
        assert len(found) == 1 and json.loads(found[0]) == view.data
    assert "<title>Attention: &lt;/script&gt;" in page
    static = page.split("</script>", 1)[1]  # the script and style, after the payload
    for web in ("http://", "https://", "fetch(", "XMLHttpRequest", "import(", "@import", "url("):
        assert web not in static, web
    assert AttentionView(json.loads(json.dumps(view.data))).patterns.tolist() == view.patterns.tolist()


# --- in the browser ------------------------------------------------------------------------
PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var steps = %s, out = {snaps: [], error: null};
  function view(n) { return document.querySelectorAll("div.hl-attn")[n]; }
  function tok(v, p, i) { return v.querySelectorAll(".hl-" + p + " .hl-tok")[i]; }
  function fire(e, type, init) { e.dispatchEvent(new MouseEvent(type, Object.assign({bubbles: true}, init || {}))); }
  function all(v, sel, f) { return Array.prototype.map.call(v.querySelectorAll(sel), f); }
  function snap(v) {
    var ws = function (p) { return all(v, ".hl-" + p + " .hl-tok", function (s) { return s.getAttribute("data-w"); }); };
    var focus = function (p) { var f = v.querySelector(".hl-" + p + " .hl-tok.hl-focus"); return f ? +f.getAttribute("data-i") : null; };
    var top = function (p) { return all(v, ".hl-" + p + "-top .hl-item", function (s) { return [+s.getAttribute("data-i"), s.querySelector("b").textContent]; }); };
    return {head: v.getAttribute("data-head"), layer: v.querySelector("select.hl-layer").value,
            head_option: v.querySelector("select.hl-headsel").value, from: ws("from"), to: ws("to"),
            from_focus: focus("from"), to_focus: focus("to"), from_top: top("from"), to_top: top("to"),
            readout: v.querySelector(".hl-readout").textContent, note: v.querySelector(".hl-headnote").textContent, pinned: v.classList.contains("hl-pinned"),
            background: all(v, ".hl-from .hl-tok", function (s) { return s.style.background; }),
            matrix: v.querySelector(".hl-matrix canvas").toDataURL(), thumb: v.querySelectorAll("canvas.hl-thumb")[2].toDataURL()};
  }
  try {
    steps.forEach(function (s) {
      var v = view(s[1]);
      if (s[0] === "hover" || s[0] === "click") fire(tok(v, s[2], s[3]), s[0] === "hover" ? "mouseover" : "click");
      else if (s[0] === "select") { var e = v.querySelector("select.hl-" + s[2]); e.value = String(s[3]); e.dispatchEvent(new Event("change", {bubbles: true})); }
      else if (s[0] === "thumb") fire(v.querySelectorAll("canvas.hl-thumb")[s[2]], "click");
      else if (s[0] === "cell") { var c = v.querySelector(".hl-matrix canvas"), r = c.getBoundingClientRect();
        fire(c, "mousemove", {clientX: r.left + (s[3] + 0.5) * r.width / c.width, clientY: r.top + (s[2] + 0.5) * r.height / c.height}); }
      else if (s[0] === "key") v.dispatchEvent(new KeyboardEvent("keydown", {key: s[2], bubbles: true}));
      else if (s[0] === "snap") out.snaps.push(snap(v));
    });
  } catch (e) { out.error = String(e); }
  out.errors = window.__errors; out.failed = window.__failed;
  out.views = document.querySelectorAll("div.hl-attn").length;
  out.built = document.querySelectorAll("div.hl-attn[data-built]").length;
  out.messages = all(document, "div.hl-attn > pre", function (p) { return p.textContent; });
  out.resources = performance.getEntriesByType("resource").map(function (e) { return e.name; });
  out.external = Array.prototype.filter.call(document.querySelectorAll("[src],[href]"), function (e) {
    return /^(https?:)?\\/\\//.test(e.getAttribute("src") || e.getAttribute("href")); }).length;
  out.sections = all(document, "h2[id]", function (h) { return h.id; });
  var pre = document.createElement("pre"); pre.id = "headlens-probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 50); });
</script>"""


def replay(page: str, steps: list, tmp_path) -> dict:
    """Load ``page`` (HTML text) in Chromium with the probe replaying ``steps``; what it saw."""
    probe = PROBE % json.dumps(steps)
    if "<head>" not in page:
        page = f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{page}</body></html>"
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", probe + "</body>", 1))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--proxy-server=127.0.0.1:9",
                   "--dump-dom", copy.as_uri())
    found = re.search(r'<pre id="headlens-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))
    assert seen["error"] is None, seen["error"]
    return seen


def shown(values) -> np.ndarray:
    """The weights a panel shows (NaN where a token is masked)."""
    return np.array([np.nan if v is None else float(v) for v in values])


def assert_shows(snap, pattern, q, k):
    """The two panels show row ``q`` and column ``k`` of ``pattern [T, T]`` (masked: not shown)."""
    row, col = shown(snap["from"]), shown(snap["to"])
    assert np.allclose(row[~np.isnan(row)], pattern[q][~np.isnan(row)], atol=ROUNDING)
    assert np.allclose(col[~np.isnan(col)], pattern[:, k][~np.isnan(col)], atol=ROUNDING)
    return row, col


@needs_chromium
def test_notebook_views_respond_to_clicks_and_hovers(planted, bert, bert_hf, mistral, mistral_hf, tmp_path):
    model, ids = planted
    dec, enc = attention(model, ids, head_notes={k: v for k, v in ROLES.items()}), attention(bert, TEXT)
    broken = AttentionView(dict(enc.data, values=enc.data["values"][:-8]))
    window = attention(mistral, TEXT)
    page = "".join(v._repr_html_() for v in (dec, enc, broken, window))  # four outputs of one notebook
    steps = [["snap", 0], ["hover", 0, "from", 5], ["snap", 0],                         # 0, 1
             ["select", 0, "layer", 1], ["select", 0, "headsel", 2], ["hover", 0, "to", 12], ["snap", 0],  # 2
             ["thumb", 0, 1], ["snap", 0],                                              # 3: head 0.1
             ["click", 0, "from", 3], ["hover", 0, "from", 9], ["snap", 0],             # 4: pinned at 3
             ["click", 0, "to", 3], ["hover", 0, "from", 9], ["snap", 0],               # 5: let go
             ["key", 0, "ArrowRight"], ["snap", 0],                                     # 6: head 0.2 (uniform)
             ["select", 0, "scale", "max"], ["snap", 0],                                # 7
             ["key", 0, "ArrowDown"], ["snap", 0],                                      # 8: head 1.2
             ["cell", 0, 10, 9], ["snap", 0],                                           # 9: query 10, key 9
             ["hover", 1, "from", 4], ["snap", 1],                                      # 10
             ["select", 1, "layer", 1], ["select", 1, "headsel", 3], ["snap", 1],       # 11
             ["cell", 1, 2, 7], ["snap", 1],                                            # 12
             ["thumb", 3, 4], ["hover", 3, "from", 8], ["snap", 3]]                     # 13: head 0.4
    seen = replay(page, steps, tmp_path)
    s = seen["snaps"]
    assert seen["views"] == seen["built"] == 4 and seen["resources"] == [] and seen["external"] == 0
    assert len(seen["errors"]) == 1 and "attention payload has" in seen["errors"][0]  # the broken one, alone
    assert len(seen["messages"]) == 1 and "attention payload has" in seen["messages"][0]
    p = dec.patterns  # heads 0.0 .. 1.3
    assert s[0]["head"] == "0.0" and set(s[0]["from"]) == {None} and s[0]["from_focus"] is None
    row, col = assert_shows(s[1], p[0], 5, 5)
    assert s[1]["from_top"][0] == [4, "1.000"] and s[1]["to_top"][0] == [6, "1.000"]  # previous-token head
    assert np.isnan(row[6:]).all() and np.isnan(col[:5]).all() and not np.isnan(row[:6]).any()  # causal
    assert s[2]["head"] == "1.2" and (s[2]["layer"], s[2]["head_option"]) == ("1", "2")
    assert_shows(s[2], p[6], 12, 12)
    assert s[2]["from_top"][0] == [5, "1.000"]  # induction: 12 repeats token 4, whose successor is 5
    assert s[3]["head"] == "0.1" and (s[3]["layer"], s[3]["head_option"]) == ("0", "1")
    assert s[3]["from_top"][0] == [0, "1.000"]  # the first-token head, same focus token
    assert s[4]["pinned"] and s[4]["from_focus"] == 3 and s[5]["from_focus"] == 9 and not s[5]["pinned"]
    assert s[6]["head"] == "0.2" and s[8]["head"] == "1.2"
    assert_shows(s[6], p[2], 9, 9)
    assert s[7]["from"] == s[6]["from"] and s[7]["background"] != s[6]["background"]  # the colour scale only
    assert s[7]["matrix"] != s[6]["matrix"] and s[7]["thumb"] != s[6]["thumb"] and s[6]["thumb"] == s[0]["thumb"]
    assert (s[9]["from_focus"], s[9]["to_focus"]) == (10, 9)  # crosshair: row 10, column 9
    assert_shows(s[9], p[6], 10, 9)
    assert s[9]["readout"] == f'query "{ids[10]}" (10) \u2192 key "{ids[9]}" (9): {p[6][10, 9]:.3f}'
    ref = hf_patterns(bert_hf, ids_of(bert, TEXT))
    row, col = assert_shows(s[10], ref[0], 4, 4)
    assert not np.isnan(row).any() and not np.isnan(col).any()  # an encoder sees every token
    assert s[11]["head"] == "1.3"
    assert_shows(s[11], ref[7], 4, 4)
    assert_shows(s[12], ref[7], 2, 7)
    ref = hf_patterns(mistral_hf, ids_of(mistral, TEXT))
    assert s[13]["head"] == "0.4" and s[13]["note"] == " head 0.4 \u00b7 kv head 1"  # 6 heads over 2 kv heads
    row, col = assert_shows(s[13], ref[4], 8, 8)
    assert np.flatnonzero(~np.isnan(row)).tolist() == [5, 6, 7, 8]    # the window: 4 keys up to the query
    assert np.flatnonzero(~np.isnan(col)).tolist() == [8, 9, 10, 11]  # ... and 4 queries from the key


@needs_chromium
def test_the_report_shows_the_notebook_view(tiny_gpt2, tmp_path):
    """The report's viewer section (written as the pipeline writes it, rendered from the folder
    as Report.load reads it) is the view headlens.viz.attention gives in a notebook."""
    rep = fake_report(tmp_path / "r")
    add_view(rep.run, tiny_gpt2, TEXT, rep.heads, rep.out)
    (rep.out / "run.json").write_text(json.dumps(rep.run))
    back = Report.load(rep.out)
    assert back.run["attention_view"] == VIEW_FILE and VIEW_FILE in back.run["files"]
    page = render.render_html(back)
    roles = {(r.layer, r.head): r.role for r in rep.heads.itertuples()}
    notebook = attention(tiny_gpt2, TEXT, head_notes=roles, max_tokens=MAX_TOKENS, max_bytes=MAX_BYTES)
    def same(html):
        return re.sub(r'id="hl-attn-[0-9a-f]+"', "", html)
    assert same(notebook.html()) in same(page)
    md = render.render_markdown(back)
    assert "## Attention viewer" in md and "hl-attn" not in md
    seen = replay(page, [["hover", 0, "from", 6], ["snap", 0], ["thumb", 0, 9], ["snap", 0]], tmp_path)
    assert seen["errors"] == [] and seen["failed"] == [] and seen["resources"] == [] and seen["external"] == 0
    assert seen["sections"][seen["sections"].index("patterns") + 1] == "viewer" and seen["built"] == 1
    s, p = seen["snaps"], notebook.patterns
    assert s[0]["head"] == "0.0" and s[0]["note"].endswith("previous-token")
    assert_shows(s[0], p[0], 6, 6)
    assert s[1]["head"] == "2.1" and s[1]["note"].endswith("first-token sink")
    assert_shows(s[1], p[9], 6, 6)

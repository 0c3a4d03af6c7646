/* headlens attention viewer: turns every div.hl-attn of the page not built yet into a viewer.
   Vanilla JavaScript, no library, nothing fetched. The payload (headlens/viz/data.py) is JSON in
   the div's script.hl-attn-data: tokens, layers [[layer, [head, ...]], ...], and every head's
   pattern as base64 integers round(p * 10^digits) (width 1 or 2 bytes, little-endian), the lower
   triangle only for causal models, heads in layer-major order. */
(function () {
  "use strict";

  function decode(d) {
    var T = d.tokens.length, bin = atob(d.values), bytes = new Uint8Array(bin.length);
    for (var b = 0; b < bin.length; b++) bytes[b] = bin.charCodeAt(b);
    var scale = Math.pow(10, d.digits), per = d.causal ? T * (T + 1) / 2 : T * T, heads = [], n = 0;
    d.layers.forEach(function (lh) {
      lh[1].forEach(function (head) {
        var w = new Float32Array(T * T), at = n * per;
        for (var q = 0; q < T; q++) {
          var last = d.causal ? q : T - 1;
          for (var k = 0; k <= last; k++, at++) {
            var v = d.width === 2 ? bytes[2 * at] + 256 * bytes[2 * at + 1] : bytes[at];
            w[q * T + k] = v / scale;
          }
        }
        heads.push({ layer: lh[0], head: head, w: w });
        n++;
      });
    });
    if (n * per * d.width !== bytes.length) throw new Error("attention payload has " + bytes.length + " bytes, expected " + n * per * d.width);
    return heads;
  }

  function el(tag, cls, text, parent) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function label(tok) {
    if (tok === "") return "\u2205";
    return tok.replace(/\r?\n/g, "\u23CE").replace(/\t/g, "\u21E5");
  }

  var WHITE = [255, 255, 255], BLUE = [8, 69, 148], MASKED = [241, 241, 243];

  var LUT = new Uint8ClampedArray(3 * 256);  /* white -> blue in 256 steps */
  for (var step = 0; step < 256; step++) {
    for (var c = 0; c < 3; c++) LUT[3 * step + c] = Math.round(WHITE[c] + (BLUE[c] - WHITE[c]) * step / 255);
  }

  function build(root) {
    var d = JSON.parse(root.querySelector("script.hl-attn-data").textContent);
    var T = d.tokens.length, heads = decode(d), fmt = function (v) { return v.toFixed(d.digits); };
    var state = { index: 0, q: null, k: null, pinned: false, scale: "raw" };
    var painted = null;  /* the head and scale the matrix shows */

    function visible(q, k) {
      if (!d.causal) return true;
      return k <= q && (!d.sliding_window || q - k < d.sliding_window);
    }

    root.tabIndex = 0;
    var top = el("div", "hl-top", null, root);
    el("b", null, d.title, top);
    el("span", "hl-sub", " \u00B7 " + T + " tokens \u00B7 " + heads.length + " heads \u00B7 " +
       (d.causal ? "decoder (causal" + (d.sliding_window ? ", window " + d.sliding_window : "") + ")" : "encoder"), top);
    if (d.note) el("div", "hl-note", d.note, root);

    var controls = el("div", "hl-controls", null, root);
    el("label", null, "Layer ", controls);
    var layerSel = el("select", "hl-layer", null, controls);
    d.layers.forEach(function (lh, i) { var o = el("option", null, String(lh[0]), layerSel); o.value = String(i); });
    el("label", null, " Head ", controls);
    var headSel = el("select", "hl-headsel", null, controls);
    var prev = el("button", "hl-prev", "\u25C0", controls), next = el("button", "hl-next", "\u25B6", controls);
    prev.type = next.type = "button";
    prev.title = "previous head (\u2190)"; next.title = "next head (\u2192)";
    el("label", null, " Colour ", controls);
    var scaleSel = el("select", "hl-scale", null, controls);
    [["raw", "weight"], ["max", "weight / largest"], ["max1", "weight / largest but the first token's"]]
      .forEach(function (o) { var e = el("option", null, o[1], scaleSel); e.value = o[0]; });
    var headNote = el("span", "hl-headnote", "", controls);

    var main = el("div", "hl-main", null, root);
    var left = el("div", "hl-left", null, main);
    var size = Math.max(240, Math.min(440, 6 * T));
    var wrap = el("div", "hl-matrix", null, left);
    wrap.style.width = wrap.style.height = size + "px";
    var canvas = el("canvas", null, null, wrap);
    canvas.width = canvas.height = T;
    canvas.style.width = canvas.style.height = size + "px";
    var rowBand = el("div", "hl-band hl-row", null, wrap), colBand = el("div", "hl-band hl-col", null, wrap);
    rowBand.style.height = colBand.style.width = (size / T) + "px";
    el("div", "hl-axis", "rows: queries (top = first token) \u00B7 columns: keys", left);
    var readout = el("div", "hl-readout", "hover the matrix or a token", left);

    var right = el("div", "hl-right", null, main);
    var fromTitle = el("div", "hl-ptitle", null, right);
    var fromPanel = el("div", "hl-panel hl-from", null, right);
    var fromTop = el("div", "hl-toplist hl-from-top", null, right);
    var toTitle = el("div", "hl-ptitle", null, right);
    var toPanel = el("div", "hl-panel hl-to", null, right);
    var toTop = el("div", "hl-toplist hl-to-top", null, right);
    var fromSpans = [], toSpans = [];
    d.tokens.forEach(function (tok, i) {
      [[fromPanel, fromSpans], [toPanel, toSpans]].forEach(function (p) {
        var s = el("span", "hl-tok", label(tok), p[0]);
        s.setAttribute("data-i", String(i));
        p[1].push(s);
      });
    });

    var gridBox = el("details", "hl-gridbox", null, root);
    gridBox.open = true;
    el("summary", null, "All " + heads.length + " heads on this text (click one)", gridBox);
    var grid = el("div", "hl-grid", null, gridBox), thumbs = [], n = 0;
    d.layers.forEach(function (lh) {
      var row = el("div", "hl-grow", null, grid);
      el("span", "hl-glabel", "L" + lh[0], row);
      lh[1].forEach(function () {
        var h = heads[n], c = el("canvas", "hl-thumb", null, row);
        c.width = c.height = T;
        c.setAttribute("data-index", String(n));
        c.title = h.layer + "." + h.head + (d.head_notes[h.layer + "." + h.head] ? ": " + d.head_notes[h.layer + "." + h.head] : "");
        paint(c, h, "raw");
        thumbs.push(c);
        n++;
      });
    });
    el("div", "hl-help", "Hover a token to see what it attends to (blue) and what attends to it (red); click a token " +
       "to pin it, click again or press Esc to let go. \u2190 \u2192 change head, \u2191 \u2193 change layer.", root);

    function paint(c, h, scale) {
      var ctx = c.getContext("2d"), img = ctx.createImageData(T, T), px = img.data;
      for (var q = 0; q < T; q++) {
        var m = rowMax(h, q, scale);
        for (var k = 0; k < T; k++) {
          var at = 4 * (q * T + k);
          if (visible(q, k)) {
            var s = 3 * Math.round(255 * Math.min(1, h.w[q * T + k] / m));
            px[at] = LUT[s]; px[at + 1] = LUT[s + 1]; px[at + 2] = LUT[s + 2];
          } else {
            px[at] = MASKED[0]; px[at + 1] = MASKED[1]; px[at + 2] = MASKED[2];
          }
          px[at + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
    }

    function rowMax(h, q, scale) {
      if (scale === "raw") return 1;
      var m = 0;
      for (var k = scale === "max1" ? 1 : 0; k < T; k++) if (visible(q, k)) m = Math.max(m, h.w[q * T + k]);
      return m > 0 ? m : 1;
    }

    function colour(spans, values, masked, scale, rgb) {
      var m = 0;
      if (values) values.forEach(function (v, j) { if (!masked[j] && (scale !== "max1" || j > 0)) m = Math.max(m, v); });
      m = scale === "raw" || m === 0 ? 1 : m;
      spans.forEach(function (s, j) {
        s.classList.toggle("hl-masked", masked[j]);
        if (masked[j] || values === null) { s.style.background = ""; s.style.color = ""; return; }
        var a = Math.min(1, values[j] / m);
        s.style.background = "rgba(" + rgb + "," + a.toFixed(3) + ")";
        s.style.color = a > 0.6 ? "#fff" : "";
      });
    }

    function topList(box, values, masked, what) {
      box.textContent = "";
      var order = values.map(function (v, j) { return j; }).filter(function (j) { return !masked[j]; })
        .sort(function (a, b) { return values[b] - values[a] || a - b; }).slice(0, 5);
      el("span", "hl-tl", what + ": ", box);
      order.forEach(function (j) {
        var item = el("span", "hl-item", null, box);
        item.setAttribute("data-i", String(j));
        el("b", null, fmt(values[j]), item);
        item.appendChild(document.createTextNode(" " + JSON.stringify(d.tokens[j]) + " (" + j + ")  "));
      });
    }

    function quote(i) { return JSON.stringify(d.tokens[i]) + " (" + i + ")"; }

    function render() {
      var h = heads[state.index], li = 0, pos = 0, count = 0;
      d.layers.forEach(function (lh, i) {
        if (state.index >= count && state.index < count + lh[1].length) { li = i; pos = state.index - count; }
        count += lh[1].length;
      });
      layerSel.value = String(li);
      if (headSel.getAttribute("data-layer") !== String(li)) {
        headSel.textContent = "";
        d.layers[li][1].forEach(function (head, j) { var o = el("option", null, String(head), headSel); o.value = String(j); });
        headSel.setAttribute("data-layer", String(li));
      }
      headSel.value = String(pos);
      var key = h.layer + "." + h.head, group = d.kv_group_size ? " \u00B7 kv head " + Math.floor(h.head / d.kv_group_size) : "";
      headNote.textContent = " head " + key + group + (d.head_notes[key] ? " \u00B7 " + d.head_notes[key] : "");
      root.setAttribute("data-head", key);
      thumbs.forEach(function (c, i) { c.classList.toggle("hl-sel", i === state.index); });
      if (painted !== state.index + " " + state.scale) {
        paint(canvas, h, state.scale);
        painted = state.index + " " + state.scale;
      }

      var q = state.q, k = state.k, none = [];
      for (var j = 0; j < T; j++) none.push(false);
      rowBand.style.display = q === null ? "none" : "";
      colBand.style.display = k === null ? "none" : "";
      if (q !== null) rowBand.style.top = (q * size / T) + "px";
      if (k !== null) colBand.style.left = (k * size / T) + "px";
      if (q === null) {
        fromTitle.textContent = "What a token attends to: hover a token";
        colour(fromSpans, null, none, state.scale, "");
        fromTop.textContent = "";
        fromSpans.forEach(function (s) { s.removeAttribute("data-w"); s.title = ""; });
      } else {
        var row = [], rowMask = [];
        for (j = 0; j < T; j++) { row.push(h.w[q * T + j]); rowMask.push(!visible(q, j)); }
        fromTitle.textContent = "What " + quote(q) + " attends to (pattern row, query " + q + ")";
        colour(fromSpans, row, rowMask, state.scale, "33,102,172");
        fromSpans.forEach(function (s, j) {
          s.classList.toggle("hl-focus", j === q);
          if (rowMask[j]) { s.removeAttribute("data-w"); s.title = "not visible to query " + q; return; }
          s.setAttribute("data-w", fmt(row[j]));
          s.title = "query " + q + " \u2192 key " + j + ": " + fmt(row[j]);
        });
        topList(fromTop, row, rowMask, "largest");
      }
      if (k === null) {
        toTitle.textContent = "What attends to a token: hover a token";
        colour(toSpans, null, none, state.scale, "");
        toTop.textContent = "";
        toSpans.forEach(function (s) { s.removeAttribute("data-w"); s.title = ""; });
      } else {
        var col = [], colMask = [];
        for (j = 0; j < T; j++) { col.push(h.w[j * T + k]); colMask.push(!visible(j, k)); }
        toTitle.textContent = "What attends to " + quote(k) + " (pattern column, key " + k + ")";
        colour(toSpans, col, colMask, state.scale === "max1" ? "max" : state.scale, "214,96,77");
        toSpans.forEach(function (s, j) {
          s.classList.toggle("hl-focus", j === k);
          if (colMask[j]) { s.removeAttribute("data-w"); s.title = "query " + j + " cannot see key " + k; return; }
          s.setAttribute("data-w", fmt(col[j]));
          s.title = "query " + j + " \u2192 key " + k + ": " + fmt(col[j]);
        });
        topList(toTop, col, colMask, "largest");
      }
      if (q !== null && k !== null) {
        readout.textContent = "query " + quote(q) + " \u2192 key " + quote(k) + ": " +
          (visible(q, k) ? fmt(h.w[q * T + k]) : "not visible") + (state.pinned ? "  (pinned)" : "");
      }
      root.classList.toggle("hl-pinned", state.pinned);
    }

    function focus(q, k) {
      if (state.pinned) return;
      state.q = q; state.k = k;
      render();
    }

    function select(index) {
      state.index = (index + heads.length) % heads.length;
      render();
    }

    function firstOfLayer(li) {
      var count = 0;
      for (var i = 0; i < li; i++) count += d.layers[i][1].length;
      return count;
    }

    layerSel.addEventListener("change", function () {
      var li = +layerSel.value, pos = Math.min(+headSel.value, d.layers[li][1].length - 1);
      select(firstOfLayer(li) + pos);
    });
    headSel.addEventListener("change", function () { select(firstOfLayer(+layerSel.value) + (+headSel.value)); });
    prev.addEventListener("click", function () { select(state.index - 1); });
    next.addEventListener("click", function () { select(state.index + 1); });
    scaleSel.addEventListener("change", function () {
      state.scale = scaleSel.value;
      thumbs.forEach(function (c, i) { paint(c, heads[i], state.scale); });
      render();
    });
    grid.addEventListener("click", function (e) {
      var i = e.target.getAttribute && e.target.getAttribute("data-index");
      if (i !== null && i !== undefined) select(+i);
    });
    [fromPanel, toPanel, fromTop, toTop].forEach(function (p) {
      p.addEventListener("mouseover", function (e) {
        var t = e.target.closest ? e.target.closest("[data-i]") : null;
        if (t) { var i = +t.getAttribute("data-i"); focus(i, i); }
      });
      p.addEventListener("click", function (e) {
        var t = e.target.closest ? e.target.closest("[data-i]") : null;
        if (!t) return;
        var i = +t.getAttribute("data-i");
        if (state.pinned && state.q === i && state.k === i) { state.pinned = false; }
        else { state.pinned = false; focus(i, i); state.pinned = true; }
        render();
      });
    });
    canvas.addEventListener("mousemove", function (e) {
      var r = canvas.getBoundingClientRect();
      var k = Math.floor((e.clientX - r.left) / r.width * T), q = Math.floor((e.clientY - r.top) / r.height * T);
      if (q >= 0 && q < T && k >= 0 && k < T) focus(q, k);
    });
    root.addEventListener("keydown", function (e) {
      if (e.target && e.target.tagName === "SELECT") return;
      var li = +layerSel.value, pos = +headSel.value;
      if (e.key === "ArrowRight") select(state.index + 1);
      else if (e.key === "ArrowLeft") select(state.index - 1);
      else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        li = (li + (e.key === "ArrowDown" ? 1 : d.layers.length - 1)) % d.layers.length;
        select(firstOfLayer(li) + Math.min(pos, d.layers[li][1].length - 1));
      } else if (e.key === "Escape") { state.pinned = false; render(); }
      else return;
      e.preventDefault();
    });
    render();
  }

  var roots = document.querySelectorAll("div.hl-attn:not([data-built])");
  for (var i = 0; i < roots.length; i++) {
    roots[i].setAttribute("data-built", "1");
    try { build(roots[i]); } catch (err) {
      var msg = document.createElement("pre");
      msg.textContent = "headlens attention viewer: " + err;
      roots[i].appendChild(msg);
      throw err;
    }
  }
})();

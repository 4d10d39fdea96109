"""The report site's style sheet and scripts, written next to its pages (no CDN, no fonts, no fetch()).

Data files are scripts that call `crossjaxData(kind, n, value)`: a page loads them with <script> elements, which
browsers allow from file:// where fetch() is refused. `crossjax.load(kind, n)` loads data/<kind>/<kind>_NNNNN.js
once and resolves to its value; data/meta.js (kind "meta") is loaded by a plain <script> tag before the page's own.
"""

STYLE_CSS = r"""
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 18px 60px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 22px 0 6px; } h2 { font-size: 17px; margin: 28px 0 8px; }
a { color: #0b57d0; }
.facts { color: #444; } .facts b { color: #111; }
.notes li { color: #7a4b00; }
figure { margin: 18px 0; } figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { color: #555; font-size: 13px; max-width: 900px; }
.skipped { color: #7a4b00; font-style: italic; }
.controls { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
#filter { width: 420px; padding: 5px 8px; font: inherit; }
#status { color: #555; } #status.error { color: #b00020; }
table.features { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.features th, table.features td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: right; }
table.features th { cursor: pointer; user-select: none; background: #f6f6f8; position: sticky; top: 0; }
table.features th.sorted-asc::after { content: " \25B2"; } table.features th.sorted-desc::after { content: " \25BC"; }
table.features td.str, table.features th.str { text-align: left; }
.kind { padding: 1px 6px; border-radius: 8px; font-size: 12px; background: #eee; }
.kind-emergent { background: #dff3e4; } .kind-initialisation { background: #fde7d9; }
.kind-persistent { background: #dfe9fb; } .kind-transient { background: #f3e3f7; } .kind-dead { background: #e6e6e6; }
.pager button { font: inherit; padding: 2px 8px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
svg.curve text { font-size: 11px; fill: #444; } svg.curve .axis { stroke: #999; }
details { margin: 4px 0; } summary { cursor: pointer; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; white-space: pre-wrap;
       padding: 2px 0; border-bottom: 1px dotted #eee; }
.ctx .val { display: inline-block; width: 70px; color: #666; }
.ctx mark { background: #ffe08a; padding: 0 1px; border-radius: 2px; }
table.analysis { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 8px 0; }
table.analysis th, table.analysis td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: right; }
table.analysis th { background: #f6f6f8; } table.analysis .str { text-align: left; }
table.analysis td.str a { margin-right: 6px; }
.explanation { color: #444; font-style: italic; }
"""

COMMON_JS = r"""
"use strict";
window.crossjax = window.crossjax || { loaded: {}, pending: {} };
window.crossjaxData = function (kind, n, value) { crossjax.loaded[kind + ":" + n] = value; };
crossjax.file = function (kind, n) { return "data/" + kind + "/" + kind + "_" + String(n).padStart(5, "0") + ".js"; };
crossjax.load = function (kind, n) {
  const key = kind + ":" + n;
  if (key in crossjax.loaded) return Promise.resolve(crossjax.loaded[key]);
  if (crossjax.pending[key]) return crossjax.pending[key];
  const file = crossjax.file(kind, n);
  crossjax.pending[key] = new Promise(function (resolve, reject) {
    const s = document.createElement("script");
    s.src = file;
    s.onload = function () {
      delete crossjax.pending[key];
      if (key in crossjax.loaded) resolve(crossjax.loaded[key]); else reject(new Error(file + " holds no " + key));
    };
    s.onerror = function () { delete crossjax.pending[key]; reject(new Error("cannot load " + file)); };
    document.head.appendChild(s);
  });
  return crossjax.pending[key];
};
crossjax.fmt = function (v, type) {
  if (v === null || v === undefined) return "";
  if (type === "int" || typeof v === "string") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  return (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(Number(v.toPrecision(3)));
};
crossjax.el = function (tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
};
"""

TABLE_JS = r"""
(function () {
  "use strict";
  const M = crossjax.loaded["meta:0"];
  const cols = M.columns, col = {};
  cols.forEach(function (c, i) { col[c.key] = i; });
  const VIEW = M.view_rows;
  const ALIASES = { feature: "id", id: "id", kind: "kind", emerges: "emerges", emergence: "emerges", step: "step",
                    cluster: "cluster", freq: "frequency", frequency: "frequency", sep: "separability",
                    rho: "separability", separability: "separability", norm: "peak_norm", peak: "peak_norm",
                    contexts: "contexts" };
  const table = document.getElementById("features"), tbody = table.querySelector("tbody");
  const status = document.getElementById("status"), pageinfo = document.getElementById("pageinfo");
  const state = { sort: -1, dir: 1, terms: [], text: "", page: 0, rows: null, seq: 0 };

  const head = table.querySelector("thead tr");
  cols.forEach(function (c, i) {
    const th = crossjax.el("th", c.label, c.type === "str" || c.type === "snapshot" ? "str" : "");
    th.dataset.key = c.key;
    th.title = c.help || "";
    th.addEventListener("click", function () {
      if (state.sort === i) state.dir = -state.dir; else { state.sort = i; state.dir = 1; }
      head.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(state.dir > 0 ? "sorted-asc" : "sorted-desc");
      state.page = 0; refresh(true);
    });
    head.appendChild(th);
  });

  function isNull(v, c) { return v === null || (c.type === "snapshot" && v < 0); }
  function snapshotName(v) { return v < 0 ? "never" : M.snapshots[v]; }
  function show(v, c) { return c.type === "snapshot" ? (v === null ? "" : snapshotName(v)) : crossjax.fmt(v, c.type); }

  function parse(text) {
    const terms = [];
    text.trim().split(/\s+/).filter(Boolean).forEach(function (word) {
      const m = /^([a-z_]+)(:|>=|<=|>|<|=)(.*)$/i.exec(word);
      if (!m) { terms.push({ bare: word.toLowerCase() }); return; }
      const key = ALIASES[m[1].toLowerCase()] || m[1].toLowerCase();      // attr_<task>, cx_<scorer> as they are
      if (key === undefined || !(key in col))
        throw new Error("unknown column '" + m[1] + "': use " + cols.map(function (c) { return c.key; }).join(", "));
      const c = cols[col[key]], value = m[3].toLowerCase();
      if (c.type !== "str" && c.type !== "snapshot" && isNaN(parseFloat(value)))
        throw new Error(m[1] + " needs a number, not '" + m[3] + "'");
      terms.push({ i: col[key], c: c, op: m[2], value: value });
    });
    return terms;
  }
  function compare(x, op, y) {
    return op === ">" ? x > y : op === "<" ? x < y : op === ">=" ? x >= y : op === "<=" ? x <= y : x === y;
  }
  function matches(row, t) {
    if (t.bare !== undefined) {
      return String(row[0]) === t.bare || cols.some(function (c, i) {
        return (c.type === "str" || c.type === "snapshot") && row[i] !== null &&
               String(show(row[i], c)).toLowerCase().indexOf(t.bare) >= 0;
      });
    }
    const v = row[t.i];
    if (t.c.type === "str") return v !== null && (t.op === ":" ? v.toLowerCase().startsWith(t.value) : v.toLowerCase() === t.value);
    if (t.c.type === "snapshot") {
      const at = M.snapshots.map(function (s) { return s.toLowerCase(); }).indexOf(t.value);
      if (t.op === ":" || t.op === "=") return snapshotName(v).toLowerCase() === t.value;
      return at >= 0 && v >= 0 && compare(v, t.op, at);
    }
    return v !== null && compare(v, t.op === ":" ? "=" : t.op, parseFloat(t.value));
  }
  function order(i, dir) {
    const c = cols[i];
    return function (a, b) {
      const an = isNull(a[i], c), bn = isNull(b[i], c);
      if (an || bn) return an && bn ? a[0] - b[0] : an ? 1 : -1;     // missing values last either way
      if (a[i] < b[i]) return -dir;
      if (a[i] > b[i]) return dir;
      return a[0] - b[0];
    };
  }

  function allRows(seq) {
    let done = 0;
    const pages = [];
    for (let p = 0; p < M.num_pages; p++) {
      pages.push(crossjax.load("table", p).then(function (rows) {
        done += 1;
        if (seq === state.seq && M.num_pages > 1) status.textContent = "loading table pages " + done + "/" + M.num_pages;
        return rows;
      }));
    }
    return Promise.all(pages).then(function (ps) { return [].concat.apply([], ps); });
  }
  function viewRows() {
    if (state.rows !== null) return Promise.resolve(state.rows.slice(state.page * VIEW, (state.page + 1) * VIEW));
    const first = state.page * VIEW, p = Math.floor(first / M.page_size);
    return crossjax.load("table", p).then(function (rows) {
      const at = first - p * M.page_size;
      return rows.slice(at, at + VIEW);
    });
  }
  function total() { return state.rows !== null ? state.rows.length : M.num_features; }
  function pages() { return Math.max(1, Math.ceil(total() / VIEW)); }

  function render(rows) {
    tbody.textContent = "";
    rows.forEach(function (row) {
      const tr = document.createElement("tr");
      cols.forEach(function (c, i) {
        const td = crossjax.el("td", null, c.type === "str" || c.type === "snapshot" ? "str" : "");
        if (c.key === "id") {
          const a = crossjax.el("a", String(row[i]));
          a.href = "feature.html?id=" + row[i];
          td.appendChild(a);
        } else if (c.key === "kind") {
          td.appendChild(crossjax.el("span", row[i], "kind kind-" + row[i]));
        } else td.textContent = show(row[i], c);
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    const n = total(), lo = n ? state.page * VIEW + 1 : 0, hi = Math.min(n, (state.page + 1) * VIEW);
    pageinfo.textContent = "page " + (state.page + 1) + " of " + pages();
    status.className = "";
    status.textContent = "features " + lo + "\u2013" + hi + " of " + n +
      (n < M.num_features ? " (filtered from " + M.num_features + ")" : "");
    settle("ready");
  }
  function settle(how) {
    table.dataset.renders = String(Number(table.dataset.renders || 0) + 1);   // lets a driver wait for a change
    table.dataset.state = how;
    table.dataset.filter = state.text;                                        // the filter this state shows
  }
  function fail(e) { status.className = "error"; status.textContent = e.message; settle("error"); }

  function refresh(recompute) {
    const seq = ++state.seq;
    table.dataset.state = "loading";
    const active = state.sort >= 0 || state.terms.length > 0;
    const ready = !active ? Promise.resolve(null) : !recompute && state.rows !== null ? Promise.resolve(state.rows)
      : allRows(seq).then(function (rows) {
      let kept = rows;
      state.terms.forEach(function (t) { kept = kept.filter(function (r) { return matches(r, t); }); });
      return state.sort >= 0 ? kept.slice().sort(order(state.sort, state.dir)) : kept;
    });
    ready.then(function (rows) {
      if (seq !== state.seq) return null;
      state.rows = rows;
      state.page = Math.min(state.page, pages() - 1);
      return viewRows();
    }).then(function (rows) { if (rows !== null && seq === state.seq) render(rows); })
      .catch(function (e) { if (seq === state.seq) fail(e); });
  }
  function go(page) { state.page = Math.max(0, Math.min(pages() - 1, page)); refresh(false); }

  let timer = null;
  document.getElementById("filter").addEventListener("input", function (ev) {
    clearTimeout(timer);
    timer = setTimeout(function () {
      state.text = ev.target.value;
      try { state.terms = parse(state.text); } catch (e) { state.seq++; fail(e); return; }
      state.page = 0; refresh(true);
    }, 150);
  });
  document.getElementById("first").addEventListener("click", function () { go(0); });
  document.getElementById("prev").addEventListener("click", function () { go(state.page - 1); });
  document.getElementById("next").addEventListener("click", function () { go(state.page + 1); });
  document.getElementById("last").addEventListener("click", function () { go(pages() - 1); });
  refresh(true);
})();
"""

FEATURE_JS = r"""
(function () {
  "use strict";
  const M = crossjax.loaded["meta:0"];
  const main = document.getElementById("feature"), message = document.getElementById("message");
  const raw = new URLSearchParams(location.search).get("id") || location.hash.replace(/^#/, "");
  const id = Number(raw);
  function fail(text) { message.textContent = text; message.className = "skipped"; main.dataset.state = "error"; }
  if (raw === "" || !Number.isInteger(id) || id < 0 || id >= M.num_features) {
    fail("no feature '" + raw + "': this report has features 0\u2013" + (M.num_features - 1) +
         " (open feature.html?id=N, or pick one on the index page)");
    return;
  }
  document.title = "feature " + id + " \u00b7 " + document.title;
  document.getElementById("title").textContent = "Feature " + id;
  [["prev", id - 1], ["next", id + 1]].forEach(function (p) {
    const a = document.getElementById(p[0]);
    if (p[1] >= 0 && p[1] < M.num_features) a.href = "feature.html?id=" + p[1]; else a.removeAttribute("href");
  });
  const chunk = Math.floor(id / M.chunk_size);
  crossjax.load("feature", chunk).then(function (rows) { render(rows[id - chunk * M.chunk_size]); })
    .catch(function (e) { fail(e.message); });

  function fact(dl, name, value) { dl.appendChild(crossjax.el("dt", name)); dl.appendChild(crossjax.el("dd", value)); }

  function render(f) {
    const dl = document.getElementById("facts");
    fact(dl, "kind", f.kind);
    fact(dl, "emerges at", f.em < 0 ? "never" : M.snapshots[f.em] + " (first snapshot at " + M.threshold +
         " of its peak norm)");
    fact(dl, "cluster", f.cl < 0 ? "none (dead)" : String(f.cl));
    fact(dl, "peak decoder norm", crossjax.fmt(f.peak) + " at " + M.snapshots[f.s.indexOf(Math.max.apply(null, f.s))]);
    if (M.has_frequency) fact(dl, "frequency", f.freq === null ? "" : crossjax.fmt(f.freq) + " of " + M.rows_scanned + " rows");
    if (M.has_separability)
      fact(dl, "separability", f.auc === null ? "not sampled" :
           "Spearman rho " + (f.rho === null ? "n/a (a constant curve)" : crossjax.fmt(f.rho)) + " between probe AUC and decoder norm");
    complexity(dl, f);
    curve(f);
    attribution(f);
    contexts(f);
    main.dataset.state = "ready";
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function curve(f) {
    const W = 720, H = 280, L = 48, R = 16, T = 14, B = 70, S = M.snapshots.length;
    const pos = M.steps ? M.steps.map(function (s) { return Math.log10(1 + s); }) : M.snapshots.map(function (_, i) { return i; });
    const lo = Math.min.apply(null, pos), hi = Math.max.apply(null, pos), span = hi > lo ? hi - lo : 1;
    const x = function (i) { return L + (S > 1 ? (pos[i] - lo) / span : 0.5) * (W - L - R); };
    const y = function (v) { return T + (1 - v) * (H - T - B); };
    const root = svg("svg", { "class": "curve", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    root.appendChild(svg("title", {}, "normalised decoder norm of feature " + id + " per snapshot"));
    root.appendChild(svg("line", { "class": "axis", x1: L, y1: y(0), x2: W - R, y2: y(0) }));
    root.appendChild(svg("line", { "class": "axis", x1: L, y1: y(0), x2: L, y2: y(1) }));
    [0, 0.5, 1].forEach(function (v) {
      root.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
    });
    const every = Math.max(1, Math.ceil(S / 16));
    M.snapshots.forEach(function (name, i) {
      if (i % every === 0 || i === S - 1)
        root.appendChild(svg("text", { x: x(i), y: y(0) + 12, "text-anchor": "end",
                                       transform: "rotate(-45 " + x(i) + " " + (y(0) + 12) + ")" }, name));
    });
    function line(values, color, dash, label) {
      const pts = values.map(function (v, i) { return x(i) + "," + y(v); }).join(" ");
      root.appendChild(svg("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2,
                                         "stroke-dasharray": dash, "class": "series-" + label }));
      values.forEach(function (v, i) {
        const c = svg("circle", { cx: x(i), cy: y(v), r: 3, fill: color });
        c.appendChild(svg("title", {}, M.snapshots[i] + ": " + label + " " + crossjax.fmt(v)));
        root.appendChild(c);
      });
    }
    line(f.s, "#0b57d0", "", "strength");
    if (f.auc) line(f.auc, "#e8710a", "5 3", "auc");
    const legend = f.auc ? "blue: decoder norm / peak; orange, dashed: probe AUC" : "decoder norm / peak (" +
      crossjax.fmt(f.peak) + ")";
    root.appendChild(svg("text", { x: L, y: H - 4 }, legend));
    document.getElementById("curve").appendChild(root);
  }

  function complexity(dl, f) {
    M.complexity.forEach(function (c, j) {
      const v = f.cx[j], name = "complexity (" + c.scorer + (c.model ? ", " + c.model : "") + ")";
      if (v === null) { fact(dl, name, "not scored (a sample of emerging features is)"); return; }
      const dd = crossjax.el("dd", v[0] === null ? "no score " : v[0] + " of 5 ");
      dd.appendChild(crossjax.el("span", v[1], "explanation"));
      dl.appendChild(crossjax.el("dt", name));
      dl.appendChild(dd);
    });
  }
  function attribution(f) {
    const box = document.getElementById("attribution");
    if (!box) return;                                   // no task attributed in this run
    M.attribution.forEach(function (t, j) {
      box.appendChild(crossjax.el("h3", "task " + t.task));
      const table = crossjax.el("table", null, "analysis attribution"), head = document.createElement("tr");
      table.dataset.task = t.task;
      head.appendChild(crossjax.el("th", "snapshot", "str"));
      t.methods.forEach(function (m) { head.appendChild(crossjax.el("th", m)); });
      table.appendChild(head);
      t.snapshots.forEach(function (name, s) {
        const tr = document.createElement("tr");
        tr.appendChild(crossjax.el("td", name, "str"));
        t.methods.forEach(function (m, k) { tr.appendChild(crossjax.el("td", crossjax.fmt(f.at[j][k][s]))); });
        table.appendChild(tr);
      });
      box.appendChild(table);
    });
  }

  function example(e) {
    const div = crossjax.el("div", null, "ctx");
    div.appendChild(crossjax.el("span", crossjax.fmt(e[1]), "val"));
    div.appendChild(document.createTextNode(e[2]));
    div.appendChild(crossjax.el("mark", e[3]));
    div.appendChild(document.createTextNode(e[4]));
    div.title = "store row " + e[0];
    return div;
  }
  function contexts(f) {
    const box = document.getElementById("contexts");
    if (!f.ctx) { box.appendChild(crossjax.el("p", M.contexts_note, "skipped")); return; }
    const ex = f.ctx.ex;
    if (!ex.length) { box.appendChild(crossjax.el("p", "it fired on none of the scanned rows", "skipped")); return; }
    if (M.activation !== "jumprelu") {
      box.appendChild(crossjax.el("p", "The " + M.activation + " activation is shared by every snapshot: one list."));
      ex.forEach(function (e) { box.appendChild(example(e)); });
      return;
    }
    const peak = f.s.indexOf(Math.max.apply(null, f.s));
    M.snapshots.forEach(function (name, s) {
      const d = crossjax.el("details", null, "snapshot");
      d.open = s === peak;
      d.appendChild(crossjax.el("summary", name + ": " + f.ctx.fires[s] + " of the top " + ex.length +
                                " rows open the gate (h \u00b7 n > \u03b8)"));
      ex.slice(0, f.ctx.fires[s]).forEach(function (e) { d.appendChild(example(e)); });
      box.appendChild(d);
    });
  }
})();
"""

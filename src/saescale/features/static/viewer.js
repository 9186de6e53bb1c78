// saescale feature viewer: plain JS, no build step, no network. The data arrives as scripts
// (data/index.js, data/features-<n>.js) that call window.saescale.*, so the page
// works opened straight from disk; `saescale view --live` adds the /api/live endpoint.
"use strict";
(function () {
  const S = (window.saescale = {});
  const state = { index: null, windows: {}, chunks: {}, shards: {}, waiting: {}, order: [], sort: "density", asc: false,
    query: "", limit: 500, live: false };

  S.index = (data) => { state.index = data; };
  const settle = (key, value) => {
    (state.waiting[key] || []).forEach((resolve) => resolve(value));
    delete state.waiting[key];
  };
  S.chunk = (data) => { state.chunks[data.chunk] = data.features; settle(`f${data.chunk}`, data.features); };
  S.windows = (data) => {
    Object.assign(state.windows, data);
    const any = Object.keys(data)[0];
    if (any !== undefined) { const n = Math.floor(+any / state.index.window_shard); state.shards[n] = true; settle(`w${n}`, true); }
  };

  const $ = (sel) => document.querySelector(sel);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3)
    ? Number(x).toExponential(2) : Number(x).toPrecision(d));
  const tokText = (t) => String(t).replace(/\n/g, "\u21b5");

  function loadScript(key, src, done) {
    if (done) return Promise.resolve(done);
    return new Promise((resolve, reject) => {
      const first = !state.waiting[key];
      (state.waiting[key] = state.waiting[key] || []).push(resolve);
      if (!first) return;
      const script = document.createElement("script");
      script.src = src;
      script.onerror = () => reject(new Error(`cannot load ${src}`));
      document.body.appendChild(script);
    });
  }

  const loadChunk = (n) => loadScript(`f${n}`, `data/features-${n}.js`, state.chunks[n]);

  function loadWindows(f) {
    const ids = [...f.top, ...f.samples].map((ex) => Math.floor(ex.window / state.index.window_shard));
    return Promise.all([...new Set(ids)].map((n) => loadScript(`w${n}`, `data/windows-${n}.js`, state.shards[n])));
  }

  function feature(id) {
    const chunk = state.index.chunk_of[String(id)];
    if (chunk === undefined) return Promise.reject(new Error(`latent ${id} is not among the features written`));
    return loadChunk(chunk).then((features) => features[String(id)]).then((f) => loadWindows(f).then(() => f));
  }

  // ---------------------------------------------------------------------------- the list
  function matches(row, q) {
    if (!q) return true;
    if (q.startsWith("#")) return String(row.latent) === q.slice(1);
    const hay = [...row.top_tokens, ...row.promoted, row.explanation || "", String(row.latent)].join("\u0000").toLowerCase();
    return hay.includes(q.toLowerCase());
  }

  function computeOrder() {
    const rows = state.index.features.filter((r) => matches(r, state.query.trim()));
    const key = state.sort, sign = state.asc ? 1 : -1;
    rows.sort((a, b) => {
      const x = a[key] ?? -Infinity, y = b[key] ?? -Infinity;
      return x === y ? a.latent - b.latent : (x < y ? -1 : 1) * sign;
    });
    state.order = rows.map((r) => r.latent);
    return rows;
  }

  const COLUMNS = [["latent", "latent"], ["density", "density"], ["mean", "mean"], ["max", "max act"],
    [null, "fires on"], [null, "promotes"], ["f1", "explanation (F1)"]];

  function renderList() {
    const rows = computeOrder();
    const head = COLUMNS.map(([key, label]) => `<th data-key="${key || ""}" class="${key === state.sort ? "sorted" + (state.asc ? " asc" : "") : ""}">${label}</th>`).join("");
    const body = rows.slice(0, state.limit).map((r) => `<tr class="row" data-id="${r.latent}">
      <td class="num"><a href="#/feature/${r.latent}">${r.latent}</a></td>
      <td class="num">${fmt(r.density)}</td><td class="num">${fmt(r.mean)}</td><td class="num">${fmt(r.max)}</td>
      <td>${r.top_tokens.map((t) => `<span class="chip">${esc(tokText(t))}</span>`).join("")}</td>
      <td>${r.promoted.map((t) => `<span class="chip">${esc(tokText(t))}</span>`).join("")}</td>
      <td>${r.explanation ? `<span class="tok">${esc(tokText(r.explanation))}</span> <span class="muted">${fmt(r.f1, 2)}</span>` : ""}</td></tr>`).join("");
    const more = rows.length > state.limit ? `<p><button id="more">show all ${rows.length}</button></p>` : "";
    $("#app").innerHTML = `<p class="muted" id="count">${rows.length} of ${state.index.features.length} features</p>
      <table class="list"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>${more}`;
    $("#app").querySelectorAll("th[data-key]").forEach((th) => th.addEventListener("click", () => {
      const key = th.dataset.key;
      if (!key) return;
      state.asc = state.sort === key ? !state.asc : key === "latent";
      state.sort = key;
      renderList();
    }));
    $("#app").querySelectorAll("tr.row").forEach((tr) => tr.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") location.hash = `#/feature/${tr.dataset.id}`;
    }));
    const btn = $("#more");
    if (btn) btn.addEventListener("click", () => { state.limit = Infinity; renderList(); });
  }

  // ------------------------------------------------------------------------- a feature
  function tokensHtml(tokens, acts, pos, scale) {
    const values = new Array(tokens.length).fill(0);
    acts.forEach(([p, v]) => { if (p < values.length) values[p] = v; });
    return tokens.map((t, i) => {
      const a = values[i], alpha = scale > 0 ? Math.min(1, a / scale) : 0;
      const bg = a > 0 ? `background:rgba(251,146,60,${(0.15 + 0.85 * alpha).toFixed(3)})` : "";
      return `<span class="tok${i === pos ? " max" : ""}${a > 0 ? " on" : ""}" style="${bg}" title="${esc(tokText(t))}: ${fmt(a)}">${esc(tokText(t))}</span>`;
    }).join("");
  }

  function contextHtml(ex, scale) {
    const tokens = state.windows[String(ex.window)] || [];
    return `<div class="ctx"><span class="act">${fmt(ex.act)}</span><span class="toks">${tokensHtml(tokens, ex.acts, ex.pos, scale)}</span></div>`;
  }

  function histogramSvg(h) {
    if (!h.counts.length) return `<p class="muted">never fired</p>`;
    const w = 520, ht = 120, n = h.counts.length, bw = w / n;
    const logMax = Math.log10(Math.max(...h.counts) + 1);
    const bars = h.counts.map((c, i) => {
      const y = (Math.log10(c + 1) / logMax) * (ht - 18);
      return `<rect x="${(i * bw).toFixed(1)}" y="${(ht - 14 - y).toFixed(1)}" width="${Math.max(1, bw - 1).toFixed(1)}" height="${y.toFixed(1)}"><title>${fmt(h.edges[i])}–${fmt(h.edges[i + 1])}: ${c}</title></rect>`;
    }).join("");
    return `<svg class="hist" viewBox="0 0 ${w} ${ht}" width="100%" role="img" aria-label="activation histogram">${bars}
      <text x="0" y="${ht - 2}">${fmt(h.edges[0])}</text><text x="${w}" y="${ht - 2}" text-anchor="end">${fmt(h.edges[n])}</text></svg>
      <p class="muted">positive activations, log-spaced bins; bar height log(count + 1)</p>`;
  }

  function renderFeature(id) {
    if (!state.order.length) computeOrder();
    feature(id).then((f) => {
      const at = state.order.indexOf(id);
      const prev = at > 0 ? state.order[at - 1] : null, next = at >= 0 && at + 1 < state.order.length ? state.order[at + 1] : null;
      const scale = f.max || 1;
      const stat = (label, v) => `<div class="stat"><span class="muted">${label}</span><b>${fmt(v)}</b></div>`;
      const logits = (side, cls) => f.logits[side].map(([t, v]) => `<div class="logit"><span class="tok">${esc(tokText(t))}</span><span class="${cls}">${fmt(v)}</span></div>`).join("") || `<p class="muted">–</p>`;
      const e = f.explanation;
      const bins = {};
      f.samples.forEach((s) => (bins[s.bin] = bins[s.bin] || []).push(s));
      const samples = Object.keys(bins).sort((a, b) => b - a).map((b) => {
        const s0 = bins[b][0];
        return `<h3 class="muted">bin ${+b + 1}: ${fmt(s0.bin_min)} – ${fmt(s0.bin_max)} (${fmt(100 * s0.bin_share, 2)}% of firings)</h3>${bins[b].map((s) => contextHtml(s, scale)).join("")}`;
      }).join("");
      $("#app").innerHTML = `<div class="feature" data-latent="${id}">
        <h1>Latent ${id}<span class="nav">${prev !== null ? `<a href="#/feature/${prev}" id="prev">← ${prev}</a>` : ""}
          <a href="#/">list</a> ${next !== null ? `<a href="#/feature/${next}" id="next">${next} →</a>` : ""}</span></h1>
        <div class="grid">${stat("density E[a>0]", f.density)}${stat("mean E[a]", f.mean)}${stat("E[a²]", f.mean_sq)}
          ${stat("skew", f.skew)}${stat("kurtosis", f.kurtosis)}${stat("max activation", f.max)}</div>
        <div class="cols">
          <div><div class="panel"><h2>Activation histogram</h2>${histogramSvg(f.histogram)}</div>
            <div class="panel"><h2>Explanation (N2G)</h2>${e ? `${e.patterns.map((p) => `<div class="tok">${esc(tokText(p))}</div>`).join("")}
              <p class="muted">precision ${fmt(e.precision, 2)} · recall ${fmt(e.recall, 2)} · F1 ${fmt(e.f1, 2)} on ${e.test_windows} test windows</p>` : `<p class="muted">not explained (features.explain picks a sample)</p>`}</div></div>
          <div><div class="panel cols"><div><h2>Promotes</h2>${logits("promoted", "up")}</div><div><h2>Suppresses</h2>${logits("suppressed", "down")}</div></div>
            <div class="panel"><h2>Nearest latents (decoder cosine)</h2>${f.neighbours.map(([n, c]) => `<a class="chip" href="#/feature/${n}">${n} <span class="muted">${fmt(c, 2)}</span></a>`).join("") || "–"}</div></div>
        </div>
        <div class="panel" id="top"><h2>Top activations</h2>${f.top.map((ex) => contextHtml(ex, scale)).join("") || `<p class="muted">none</p>`}</div>
        <div class="panel" id="samples"><h2>Random positive activations, by activation quantile</h2>${samples || `<p class="muted">none</p>`}</div>
      </div>`;
      window.scrollTo(0, 0);
    }).catch((err) => { $("#app").innerHTML = `<p class="error">${esc(err.message)}</p>`; });
  }

  // ------------------------------------------------------------------------------ live
  function renderLive() {
    $("#app").innerHTML = `<div class="panel"><h2>Live: which latents fire on each token</h2>
      <textarea id="live-text" maxlength="4000">To be, or not to be, that is the question.</textarea>
      <p><button id="live-run">Run</button> <span class="muted" id="live-status"></span></p><div id="live-out"></div></div>`;
    $("#live-run").addEventListener("click", runLive);
  }

  function runLive() {
    $("#live-status").textContent = "running…";
    fetch("api/live", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: $("#live-text").value }) })
      .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
      .then(({ ok, body }) => {
        if (!ok) throw new Error(body.error || "request failed");
        $("#live-status").textContent = `${body.tokens.length} tokens`;
        const maxAct = Math.max(1e-9, ...body.latents.flat().map(([, v]) => v));
        const toks = body.tokens.map((t, i) => {
          const top = body.latents[i][0];
          const alpha = top ? Math.min(1, top[1] / maxAct) : 0;
          return `<span class="tok live-tok" data-i="${i}" style="background:rgba(251,146,60,${(0.1 + 0.9 * alpha).toFixed(3)})">${esc(tokText(t))}</span>`;
        }).join("");
        $("#live-out").innerHTML = `<div class="ctx"><span class="toks">${toks}</span></div><div id="live-latents" class="muted">click a token</div>`;
        $("#live-out").querySelectorAll(".live-tok").forEach((el) => el.addEventListener("click", () => {
          const i = +el.dataset.i;
          $("#live-latents").innerHTML = `<b>${esc(tokText(body.tokens[i]))}</b>: ` + body.latents[i].map(([id, v]) =>
            `<a class="chip" href="#/feature/${id}">${id} <span class="muted">${fmt(v)}</span></a>`).join("");
        }));
      })
      .catch((err) => { $("#live-status").innerHTML = `<span class="error">${esc(err.message)}</span>`; });
  }

  // ---------------------------------------------------------------------------- routing
  function route() {
    if (!state.index) { $("#app").innerHTML = `<p class="error">data/index.js did not load: run jobs/features.py first</p>`; return; }
    const m = location.hash.match(/^#\/feature\/(\d+)/);
    if (m) renderFeature(+m[1]);
    else if (location.hash === "#/live" && state.live) renderLive();
    else renderList();
  }

  function step(delta) {
    const m = location.hash.match(/^#\/feature\/(\d+)/);
    computeOrder();  // the list's order under the current search and sort, which may have changed since it was drawn
    if (!state.order.length) return;
    const at = m ? state.order.indexOf(+m[1]) : -1;
    const next = state.order[Math.max(0, Math.min(state.order.length - 1, at + delta))];
    location.hash = `#/feature/${next}`;
  }

  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); $("#search").focus(); return; }
    if (e.key === "Escape") { if (typing) document.activeElement.blur(); location.hash = "#/"; return; }
    if (typing) return;
    if (e.key === "j" || e.key === "ArrowRight") step(1);
    else if (e.key === "k" || e.key === "ArrowLeft") step(-1);
  });

  window.addEventListener("hashchange", route);
  window.addEventListener("DOMContentLoaded", () => {
    if (state.index) {
      const i = state.index;
      $("#run").textContent = `${i.model} ${i.hook} · ${i.n_latents} latents, k=${i.k} · ${i.shown} shown · ${i.tokens} tokens (${i.shards} shards)`;
    }
    $("#search").addEventListener("input", (e) => {
      state.query = e.target.value; state.limit = 500;
      if (location.hash.startsWith("#/feature") || location.hash === "#/live") location.hash = "#/"; else renderList();
    });
    if (location.protocol.startsWith("http")) {
      fetch("api/info").then((r) => (r.ok ? r.json() : null)).then((info) => {
        if (info && info.live) { state.live = true; $("#live-link").hidden = false; if (location.hash === "#/live") route(); }
      }).catch(() => {});
    }
    route();
  });
})();

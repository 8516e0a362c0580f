// The vswitch web view: polls the daemon's read-only JSON and draws it.
// Plain DOM, no framework, no build step. Every string from the switch goes
// in through textContent or setAttribute, never as markup.
"use strict";

const FEED_MS = 250;
const SUMMARY_MS = 2000;
const MATRIX_MS = 10000;
const MAX_LIVE_ROWS = 200;
const SVG = "http://www.w3.org/2000/svg";

let lastSeq = null;
let summaryDue = false;

function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body && body.error ? body.error : r.statusText);
  return body;
}

function endpoint(ip, pod) { return pod || ip; }
function service(t) { return t.dst_port ? `${t.protocol}/${t.dst_port}` : t.protocol; }
// allow | deny | would-deny | would-allow: what a connection line shows.
function state(t) {
  if (t.staged && t.staged.verdict === "would deny" && t.verdict === "allow") return "would-deny";
  if (t.staged && t.staged.verdict === "would allow" && t.verdict === "deny") return "would-allow";
  return t.verdict;
}

// ---- live feed --------------------------------------------------------------

function liveRow(item, fresh) {
  const src = endpoint(item.src_ip, item.src_pod);
  const dst = endpoint(item.dst_ip, item.dst_pod);
  const staged = item.staged ? `${item.staged.verdict} by ${item.staged.rule}` : "";
  const tr = el("tr", {
    class: fresh ? "fresh" : null,
    "data-seq": item.seq,
    "data-verdict": item.verdict,
    "data-src": src,
    "data-dst": dst,
    "data-service": service(item),
    "data-staged": item.staged ? item.staged.verdict : null,
  },
    el("td", {}, item.time.slice(11, 23)),
    el("td", {}, src),
    el("td", {}, dst),
    el("td", {}, service(item)),
    el("td", { class: `verdict ${item.verdict}` }, item.verdict),
    el("td", {}, item.rule),
    el("td", { class: "staged" }, staged));
  return tr;
}

async function pollFeed() {
  try {
    const q = lastSeq === null ? "" : `?after=${lastSeq}`;
    const feed = await getJSON(`/api/feed${q}`);
    const body = document.querySelector("#live tbody");
    const first = lastSeq === null;
    for (const item of feed.items) {
      body.prepend(liveRow(item, !first));
    }
    while (body.rows.length > MAX_LIVE_ROWS) body.deleteRow(body.rows.length - 1);
    if (feed.items.length > 0 && !first) summaryDue = true;
    if (feed.last !== null && feed.last !== undefined) lastSeq = feed.last;
    if (summaryDue) { summaryDue = false; refreshSummary(); }
  } catch (e) {
    setStatus(false, `feed: ${e.message}`);
  }
  setTimeout(pollFeed, FEED_MS);
}

// ---- summary: pods, graph, rules --------------------------------------------

function setStatus(ready, text) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = `pill ${ready ? "ready" : "not-ready"}`;
}

function drawGraph(summary) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const defs = el("svg:defs");
  for (const s of ["allow", "deny", "would-deny", "would-allow"]) {
    defs.append(el("svg:marker", { id: `arrow-${s}`, class: s, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, el("svg:path", { d: "M0,0 L10,5 L0,10 z" })));
  }
  svg.append(defs);
  const local = new Map();
  for (const ns of summary.namespaces) {
    for (const p of ns.pods) {
      for (const ip of p.ips) local.set(ip, p.key);
    }
  }
  // Columns: one per namespace with pods here, then everything else.
  const columns = summary.namespaces.map(ns => ({ title: ns.name, items: ns.pods.map(p => ({ key: p.key, label: p.name, title: `${p.key} ${p.ips.join(" ")}`, pod: p })) }));
  const others = new Map();
  for (const t of summary.tuples) {
    for (const [ip, pod] of [[t.src_ip, t.src_pod], [t.dst_ip, t.dst_pod]]) {
      if (!local.has(ip) && !others.has(ip)) others.set(ip, { key: ip, label: pod || ip, title: pod ? `${pod} (${ip})` : ip });
    }
  }
  if (others.size > 0) columns.push({ title: "elsewhere", items: [...others.values()].slice(0, 40) });
  const W = 190, GAP = 70, H = 26, VGAP = 10, TOP = 34, PAD = 10;
  const pos = new Map();
  let height = 0;
  columns.forEach((c, i) => {
    const x = PAD + i * (W + GAP);
    const h = TOP + c.items.length * (H + VGAP) + PAD;
    height = Math.max(height, h);
    const g = el("svg:g", { class: "ns", "data-namespace": c.title });
    g.append(el("svg:rect", { x, y: 0, width: W, height: h, rx: 8 }));
    g.append(el("svg:text", { class: "title", x: x + 10, y: 20 }, c.title));
    svg.append(g);
    c.items.forEach((it, j) => {
      const y = TOP + j * (H + VGAP);
      const attrs = { class: "pod", transform: `translate(${x + 10},${y})` };
      if (it.pod) attrs["data-pod"] = it.key;
      const pg = el("svg:g", attrs, el("svg:title", {}, it.title));
      pg.append(el("svg:rect", { width: W - 20, height: H, rx: 5 }));
      pg.append(el("svg:text", { x: 8, y: 17 }, it.label.length > 24 ? it.label.slice(0, 23) + "…" : it.label));
      svg.append(pg);
      pos.set(it.key, { x: x + 10, y: y + H / 2, w: W - 20 });
    });
  });
  const width = PAD * 2 + columns.length * (W + GAP);
  svg.setAttribute("viewBox", `0 0 ${width} ${Math.max(height, 60)}`);
  svg.style.height = `${Math.max(height, 60)}px`;
  svg.style.maxWidth = `${width}px`;
  for (const t of summary.tuples) {
    const a = pos.get(local.get(t.src_ip) || t.src_ip);
    const b = pos.get(local.get(t.dst_ip) || t.dst_ip);
    if (!a || !b) continue;
    let d;
    if (a.x === b.x) {
      const x = a.x + a.w, bend = 40 + Math.abs(b.y - a.y) / 4;
      d = `M${x},${a.y} C${x + bend},${a.y} ${x + bend},${b.y} ${x},${b.y}`;
    } else if (a.x < b.x) {
      const x1 = a.x + a.w, x2 = b.x, m = (x1 + x2) / 2;
      d = `M${x1},${a.y} C${m},${a.y} ${m},${b.y} ${x2},${b.y}`;
    } else {
      const x1 = a.x, x2 = b.x + b.w, m = (x1 + x2) / 2;
      d = `M${x1},${a.y} C${m},${a.y} ${m},${b.y} ${x2},${b.y}`;
    }
    const s = state(t);
    const title = `${endpoint(t.src_ip, t.src_pod)} → ${endpoint(t.dst_ip, t.dst_pod)} ${service(t)}: ` +
      `${t.allowed} allowed, ${t.denied} denied; now ${t.verdict} by ${t.rule}` +
      (t.staged ? `; staged: ${t.staged.verdict} by ${t.staged.rule}` : "");
    svg.append(el("svg:path", { d, class: s, "marker-end": `url(#arrow-${s})`, "data-edge": `${t.src_ip}>${t.dst_ip}:${service(t)}` }, el("svg:title", {}, title)));
  }
}

function drawPods(summary) {
  const body = document.querySelector("#pods tbody");
  const rows = [];
  for (const ns of summary.namespaces) {
    ns.pods.forEach((p, i) => rows.push(el("tr", { "data-pod": p.key },
      el("td", {}, i === 0 ? ns.name : ""),
      el("td", {}, p.key),
      el("td", {}, p.ips.join(", ")),
      el("td", { class: "dim" }, Object.entries(p.labels).map(([k, v]) => `${k}=${v}`).join(" ")))));
  }
  body.replaceChildren(...rows);
}

function drawRules(summary) {
  const body = document.querySelector("#rules tbody");
  body.replaceChildren(...summary.rules.map(r => el("tr", { "data-rule": r.rule },
    el("td", {}, r.rule), el("td", {}, r.allowed), el("td", {}, r.denied),
    el("td", { class: "staged" }, r.would_deny || ""), el("td", { class: "staged" }, r.would_allow || ""))));
}

async function refreshSummary() {
  try {
    const s = await getJSON("/api/summary");
    document.getElementById("node").textContent = `node ${s.node}`;
    setStatus(s.ready, `${s.ready ? "ready" : "not ready"} · generation ${s.generation}`);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    drawGraph(s);
    drawPods(s);
    drawRules(s);
  } catch (e) {
    setStatus(false, `unreachable: ${e.message}`);
  }
}

// ---- reachability -----------------------------------------------------------

async function refreshMatrix() {
  const protocol = document.getElementById("matrix-protocol").value;
  const port = document.getElementById("matrix-port").value;
  const table = document.getElementById("matrix");
  try {
    const m = await getJSON(`/api/reachability?protocol=${encodeURIComponent(protocol)}&port=${encodeURIComponent(port)}`);
    const cell = new Map(m.cells.map(c => [`${c.from}>${c.to}`, c]));
    const head = el("tr", {}, el("th", {}, "from \\ to"), ...m.pods.map(p => el("th", {}, p)));
    const rows = m.pods.map(from => el("tr", {}, el("th", {}, from), ...m.pods.map(to => {
      if (from === to) return el("td", { class: "cell" }, "·");
      const c = cell.get(`${from}>${to}`);
      if (!c) return el("td", { class: "cell" }, "?");
      const cls = `cell ${c.verdict}${c.staged ? " would" : ""}`;
      const title = `${c.verdict} by ${c.rule}` + (c.staged ? `; staged: ${c.staged.verdict} by ${c.staged.rule}` : "");
      return el("td", { class: cls, title, "data-from": from, "data-to": to, "data-verdict": c.verdict }, c.verdict === "allow" ? "✓" : "✗");
    })));
    table.replaceChildren(head, ...rows);
    table.dataset.protocol = m.protocol;
    table.dataset.port = m.port;
    if (m.omitted > 0) table.append(el("caption", {}, `${m.omitted} more pods not shown`));
  } catch (e) {
    table.replaceChildren(el("caption", {}, `cannot compute: ${e.message}`));
  }
}

// ---- trace ------------------------------------------------------------------

async function trace(ev) {
  ev.preventDefault();
  const out = document.getElementById("trace-out");
  const spec = document.getElementById("trace-spec").value.trim();
  out.className = "";
  out.textContent = "tracing…";
  try {
    const t = await getJSON(`/api/trace?spec=${encodeURIComponent(spec)}`);
    out.textContent = t.text;
    out.dataset.verdict = t.view.verdict;
  } catch (e) {
    out.className = "error";
    out.textContent = e.message;
    delete out.dataset.verdict;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("trace-form").addEventListener("submit", trace);
  document.getElementById("matrix-form").addEventListener("submit", ev => { ev.preventDefault(); refreshMatrix(); });
  refreshSummary();
  setInterval(refreshSummary, SUMMARY_MS);
  refreshMatrix();
  setInterval(refreshMatrix, MATRIX_MS);
  pollFeed();
});

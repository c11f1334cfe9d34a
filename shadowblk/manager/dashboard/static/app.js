// The live dashboard: one EventSource on /dashboard/stream; every message redraws the page.
"use strict";

const WINDOW_S = 300;
const history = [];  // samples {t, lag: {}, p99_ms: {}, fp: {}}, oldest first

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function seconds(s) { return s === null || s === undefined ? "–" : `${s.toFixed(1)} s`; }
function cls(text) { return text.replace(/\s+/g, "-"); }
function when(t) { return new Date(t * 1000).toLocaleTimeString(); }

// An action (switchover a volume, drain a server) asks first: the confirmation panel names
// what will move, takes the bearer token (kept for this tab only) and a reason, and shows the
// manager's answer.
function action(label, what, path) {
  const b = el("button", {"data-action": path}, label);
  b.addEventListener("click", () => confirmAction(what, path));
  return b;
}

function confirmAction(what, path) {
  const panel = document.getElementById("confirm");
  panel.dataset.path = path;
  document.getElementById("confirm-what").textContent = what;
  document.getElementById("confirm-token").value = sessionStorage.getItem("token") || "";
  const result = document.getElementById("confirm-result");
  result.textContent = "";
  delete result.dataset.status;
  panel.hidden = false;
}

async function runAction() {
  const panel = document.getElementById("confirm");
  const token = document.getElementById("confirm-token").value.trim();
  const reason = document.getElementById("confirm-reason").value.trim() || "dashboard";
  const result = document.getElementById("confirm-result");
  sessionStorage.setItem("token", token);
  result.textContent = "working…";
  delete result.dataset.status;
  try {
    const reply = await fetch(panel.dataset.path, {
      method: "POST",
      headers: {"Authorization": `Bearer ${token}`, "Content-Type": "application/json"},
      body: JSON.stringify({reason}),
    });
    const doc = await reply.json().catch(() => ({}));
    result.dataset.status = String(reply.status);
    result.textContent = reply.ok ? outcome(doc) : `refused (${reply.status}): ${doc.error || reply.statusText}`;
  } catch (err) {
    result.dataset.status = "0";
    result.textContent = `no answer from the manager: ${err}`;
  }
}

// a switchover record, or a drain's list of them, in one line
function outcome(doc) {
  const records = doc.switchovers || [doc];
  if (!records.length) return "nothing to move";
  return records.map(r => `${r.volume}: ${r.from} → ${r.to} ${r.outcome}` +
    (r.pause_seconds !== undefined ? `, I/O paused ${(r.pause_seconds * 1000).toFixed(1)} ms` : "")).join("; ");
}

document.getElementById("confirm-go").addEventListener("click", runAction);
document.getElementById("confirm-cancel").addEventListener("click", () => {
  document.getElementById("confirm").hidden = true;
});

function renderAlerts(alerts, leading) {
  const count = document.getElementById("alert-count");
  count.textContent = alerts.length;
  count.className = alerts.length ? "count firing" : "count";
  const list = document.getElementById("alerts");
  if (!alerts.length) {
    list.replaceChildren(el("li", {class: "none"}, leading ? "none" : "none here: the leading manager evaluates alerts"));
    return;
  }
  list.replaceChildren(...alerts.map(a => el("li", {class: a.severity, "data-alert": a.name},
    `[${a.severity}] ${a.name}: ${a.summary}${a.description ? " — " + a.description : ""} (since ${when(a.starts_at)})`)));
}

function renderVolumes(volumes) {
  const body = document.querySelector("#volumes tbody");
  body.replaceChildren(...volumes.map(v => el("tr", {"data-volume": v.name},
    el("td", {}, v.name),
    el("td", {class: cls(v.health), "data-health": v.name}, v.health),
    el("td", {}, v.mode), el("td", {"data-primary": v.name}, v.primary),
    el("td", {}, v.generation), el("td", {}, v.epoch ?? "–"),
    el("td", {}, bytes(v.written_bytes)), el("td", {}, bytes(v.dirty_bytes)),
    el("td", {}, ...v.shadows.map(s => el("span", {class: "shadow"},
      `${s.server}: `, el("span", {class: cls(s.state)}, s.state), ", lag ",
      el("span", {"data-lag": `${v.name}/${s.server}`}, seconds(s.lag_seconds)),
      ` / ${bytes(s.lag_bytes)}`))),
    el("td", {}, action("switchover…", `switch volume ${v.name} over from ${v.primary} to a shadow`,
      `/v1/volumes/${encodeURIComponent(v.name)}/switchover`)))));
}

function renderServers(servers) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren(...servers.map(s => {
    const l = s.latency_ms || {};
    const lat = l.p50 === undefined ? "–" : `${l.p50} / ${l.p99} / ${l.p999} ms`;
    return el("tr", {"data-server": s.name},
      el("td", {}, s.name), el("td", {class: s.state}, s.state), el("td", {}, `${s.zone} / ${s.rack}`),
      el("td", {"data-fp": s.name}, s.failure_probability.toFixed(2)),
      el("td", {}, risk(s) + (s.failure_reasons.join("; ") || "–")), el("td", {}, lat),
      el("td", {}, s.io_errors), el("td", {}, s.checksum_discrepancies),
      el("td", {}, `${s.heartbeat_age_s} s ago`), el("td", {}, action("drain…",
        `move every primary off server ${s.name}`, `/v1/servers/${encodeURIComponent(s.name)}/drain`)));
  }));
}

// the predictor's confidence and where its trigger stands, beside the probability
function risk(s) {
  const parts = [s.failure_level, s.failure_trigger && s.failure_trigger !== "armed" ? s.failure_trigger : null];
  const shown = parts.filter(Boolean);
  return shown.length ? `[${shown.join(", ")}] ` : "";
}

function describe(e) {
  const d = e.detail;
  if (e.kind === "failure-preempt") {
    const what = d.dry_run ? "dry run: would move" : "moving";
    return `${e.volume}: predicted failure, probability ${d.probability.toFixed(2)}; ${what} ${d.primaries.join(", ") || "no primary"}`;
  }
  if (e.kind === "switchover") return `${e.volume}: primary ${d.from} → ${d.to}, generation ${d.generation}`;
  const pause = d.pause_seconds === undefined ? "" : `, I/O paused ${(d.pause_seconds * 1000).toFixed(1)} ms`;
  return `${e.volume}: switchover ${d.from ?? "?"} → ${d.to ?? "?"} ${d.outcome}${pause}${d.reason ? " (" + d.reason + ")" : ""}`;
}

function renderTimeline(events, now) {
  const list = document.getElementById("timeline");
  if (events.length) {
    list.replaceChildren(...events.slice().reverse().map(e => el("li",
      {"data-seq": e.seq, "data-kind": e.kind, class: e.detail.outcome === "failed" ? "critical" : ""},
      `${when(e.at)} ${describe(e)}`)));
  }
  const strip = document.getElementById("timeline-strip");
  const w = strip.clientWidth || 800;
  strip.replaceChildren();
  strip.setAttribute("viewBox", `0 0 ${w} 40`);
  // the last hour at most; a shorter past (one minute at least) fills the strip
  const span = Math.min(3600, Math.max(60, ...events.map(e => now - e.at + 10)));
  const t0 = now - span;
  strip.appendChild(svgEl("line", {x1: 0, x2: w, y1: 20, y2: 20, stroke: "#8c959f"}));
  strip.appendChild(svgEl("text", {x: 2, y: 38, class: "legend"}, `-${Math.round(span / 60)} min`));
  strip.appendChild(svgEl("text", {x: w - 2, y: 38, "text-anchor": "end", class: "legend"}, "now"));
  for (const e of events.filter(e => e.at >= t0)) {
    const x = (e.at - t0) / span * (w - 8) + 4;
    const colour = e.detail.outcome === "failed" || e.kind === "failure-preempt" ? "#cf222e"
      : e.kind === "switchover" ? "#0969da" : "#1a7f37";
    const mark = svgEl("circle", {cx: x, cy: 20, r: 5, fill: colour});
    mark.appendChild(svgEl("title", {}, describe(e)));
    strip.appendChild(mark);
  }
}

function series(key) {
  const out = {};
  for (const s of history) for (const [name, v] of Object.entries(s[key])) (out[name] ||= []).push([s.t, v]);
  return out;
}

function renderPlots() {
  linePlot(document.getElementById("plot-lag"), series("lag"), WINDOW_S);
  linePlot(document.getElementById("plot-latency"), series("p99_ms"), WINDOW_S);
  linePlot(document.getElementById("plot-fp"), series("fp"), WINDOW_S, 1);
}

function render(state) {
  document.getElementById("role").textContent = state.leading ? "leader" : "standby";
  document.getElementById("updated").textContent = `updated ${when(state.at)}`;
  renderAlerts(state.alerts, state.leading);
  renderVolumes(state.volumes);
  renderServers(state.servers);
  renderTimeline(state.switchovers, state.at);
  renderPlots();
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/dashboard/stream");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn lost"; };
  source.onmessage = ev => {
    const msg = JSON.parse(ev.data);
    if (msg.history) history.splice(0, history.length, ...msg.history);
    if (msg.sample) history.push(msg.sample);
    while (history.length && history[0].t < msg.state.at - WINDOW_S) history.shift();
    render(msg.state);
  };
}

connect();

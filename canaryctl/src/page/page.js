// The rollout page: reads the admin API (/v1/status, /v1/rollouts, the charts) every 2 s and shows it. No
// framework, no build step: canaryctl serves this file as it is. Data is put in the page with textContent only
// (signatures and examples come from access logs: never read as HTML). The token lives in this script's memory:
// sent in the Authorization header, never in an address, never stored.
"use strict";

const REFRESH_MS = 2000;
const CHARTS_EVERY = 2; // refreshes between two chart loads
let token = null;
let chosen = null; // the rollout shown
let refreshes = 0;
let timer = null;
const chartUrls = {};

const $ = (id) => document.getElementById(id);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token !== null) h["Authorization"] = "Bearer " + token;
  return h;
}

class Unauthorized extends Error {}

async function api(path, body) {
  const init = body === undefined
    ? { headers: headers(), cache: "no-store" }
    : { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (response.status === 401) throw new Unauthorized("this needs the admin token");
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = c instanceof Node ? (() => { const t = el("td"); t.appendChild(c); return t; })() : el("td", c);
    if (numeric && numeric.includes(i)) td.className = "n";
    tr.appendChild(td);
  });
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// Numbers as `rollout status` prints them: evidence 72.1, or 3.4e12 far past any threshold.
function evidence(v) {
  if (v === null || v === undefined) return "";
  return v < 1e5 ? v.toFixed(1) : v.toExponential(1).replace("e+", "e");
}

function pct(rate) {
  return (rate * 100).toFixed(2) + "%";
}

function when(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

function set(field, value, root) {
  for (const e of (root || document).querySelectorAll('[data-field="' + field + '"]')) e.textContent = value ?? "";
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("forget").hidden = true;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function refresh() {
  try {
    const [status, list] = await Promise.all([api("/v1/status"), api("/v1/rollouts")]);
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget").hidden = token === null;
    showFleet(status);
    showRollouts(list.rollouts || [], status);
    set("updated", "updated " + new Date().toLocaleTimeString());
    refreshes += 1;
  } catch (err) {
    if (err instanceof Unauthorized) {
      token = null;
      showLogin(refreshes > 0 || $("token").dataset.tried ? "That token was refused." : "");
      return;
    }
    set("updated", "cannot read canaryctl: " + err.message);
  }
  schedule();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
}

function showFleet(status) {
  const envoys = status.envoys || [];
  const desired = status.desired ? status.desired.version : null;
  $("where").textContent = "desired version " + desired + (status.state && status.state.saved === false
    ? " (NOT saved: " + (status.state.line || "") + ")" : "");
  const connected = envoys.filter((e) => e.link === "connected").length;
  const current = envoys.filter((e) => e.acked_version === desired).length;
  set("fleet-summary", envoys.length + " Envoys, " + connected + " connected, " + current +
    " applied version " + desired + (status.hold ? "; " + status.hold.line : ""));
  fill($("fleet").querySelector("tbody"), envoys.map((e) => {
    const tr = row([e.node_id, e.cluster, e.link, e.acked_version ?? "none", e.replica ?? "",
      e.nack ? "refused version " + e.nack.version + ": " + e.nack.error : ""]);
    tr.dataset.node = e.node_id;
    return tr;
  }));
}

function showRollouts(rollouts, status) {
  $("no-rollout").hidden = rollouts.length > 0;
  $("rollout").hidden = rollouts.length === 0;
  if (rollouts.length === 0) return;
  const names = rollouts.map((r) => r.rollout);
  if (!names.includes(chosen)) {
    const active = rollouts.find((r) => r.phase !== "promoted" && r.phase !== "rolled_back");
    chosen = (active || rollouts[rollouts.length - 1]).rollout;
  }
  fill($("rollout-tabs"), rollouts.map((r) => {
    const b = el("button", r.rollout + " (" + r.phase.replace("_", " ") + ")");
    b.type = "button";
    if (r.rollout === chosen) b.className = "chosen";
    b.addEventListener("click", () => { chosen = r.rollout; refreshes = 0; refresh(); });
    return b;
  }));
  showRollout(rollouts.find((r) => r.rollout === chosen), status);
}

// Each version's share of the rollout in the desired config (what the Envoys are told): stable has the rest.
function split(status, name) {
  const config = status.desired && status.desired.config;
  const rollout = config && (config.rollouts || []).find((r) => r.name === name);
  if (!rollout) return null;
  const canaries = (rollout.canaries || []).map((c) => [c.version, Number(c.percent)]);
  const rest = 100 - canaries.reduce((sum, c) => sum + c[1], 0);
  return [[rollout.stable, Math.round(rest * 1000) / 1000]].concat(canaries);
}

function showRollout(r, status) {
  const root = $("rollout");
  root.dataset.rollout = r.rollout;
  for (const f of ["rollout", "canary", "stable", "phase", "step_name", "percent"]) set(f, r[f], root);
  $("phase").className = "phase " + r.phase;
  set("reason", r.reason ? "Why: " + r.reason : "", root);
  set("held", r.held || (r.evidence_gap ? "Waiting for evidence: " + r.evidence_gap.missing.join("; ") : ""), root);
  const finished = r.phase === "promoted" || r.phase === "rolled_back";
  $("at-step").textContent = finished ? "Ended at" : "Now at";
  const shares = split(status, r.rollout);
  const canaryShare = shares ? (shares.find((v) => v[0] === r.canary) || [r.canary, 0])[1] : 0;
  set("split", shares ? shares.map((v) => v[0] + " " + v[1] + "%").join(", ") : "unknown", root);
  $("canary-share").style.width = Math.min(100, canaryShare) + "%";
  fill($("timeline"), r.steps.map((s, i) => {
    const li = el("li", (i + 1) + ". " + (s === "pause" ? "pause" : s + "%"));
    if (i + 1 < r.step || (r.phase === "promoted" && i + 1 === r.step)) li.className = "passed";
    else if (i + 1 === r.step) li.className = "current " + r.phase;
    return li;
  }));

  for (const b of document.querySelectorAll(".actions button")) {
    const op = b.dataset.op;
    b.disabled = finished || (op === "pause" && r.phase !== "progressing") ||
      (op === "resume" && r.phase === "progressing");
  }

  // One row a count test: `bad` names its events in the API ("errors", "slow", "events").
  const testRow = (key, name, t, bad) => {
    const tr = row([name,
      t["canary_" + bad] + " / " + t.canary_requests + " (" + pct(t.canary_rate) + ")",
      t["stable_" + bad] + " / " + t.stable_requests + " (" + pct(t.stable_rate) + ")",
      evidence(t.e_value), evidence(t.threshold)], [1, 2, 3, 4]);
    tr.dataset.test = key;
    return tr;
  };
  fill($("tests").querySelector("tbody"), [
    testRow("errors", "errors", r.evidence.errors, "errors"),
    ...(r.latency.checks || []).map((c) =>
      testRow("latency_" + c.slower_than_us, "slower than " + c.slower_than, c, "slow")),
    ...(r.metrics || []).map((m) => testRow("metric_" + m.name, "metric " + m.name, m, "events")),
  ]);

  const f = r.findings;
  $("findings-note").textContent = f.canary_requests + " requests on " + r.canary + ", " + f.stable_requests +
    " on " + r.stable + (f.roll_back ? "; a new or worse signature rolls back at its threshold"
      : "; signatures are shown, they do not roll back (--findings off)");
  fill($("findings").querySelector("tbody"), f.signatures.map((s) => {
    const sig = el("span", s.origin + " " + s.signature, "sig");
    const cell = el("div");
    cell.appendChild(sig);
    if (s.example) cell.appendChild(el("div", "e.g. " + s.example, "note"));
    const tr = row([s.class + (s.rolls_back ? " ⟲" : ""), s.canary + " (" + pct(s.canary_rate) + ")",
      s.stable + " (" + pct(s.stable_rate) + ")", evidence(s.e_value), evidence(s.threshold), cell], [1, 2, 3, 4]);
    tr.dataset.signature = s.origin + " " + s.signature;
    return tr;
  }));

  fill($("history"), r.history.slice().reverse().map((h) => {
    const li = el("li");
    li.append(el("time", when(h.at_unix)), " ", el("span", h.what, "what"));
    return li;
  }));

  if (refreshes % CHARTS_EVERY === 0) loadCharts(r.rollout);
}

async function loadCharts(name) {
  for (const img of document.querySelectorAll("img[data-chart]")) {
    const which = img.dataset.chart;
    try {
      const query = "?rollout=" + encodeURIComponent(name) + "&chart=" + which;
      const response = await fetch("/v1/rollouts/chart" + query, { headers: headers(), cache: "no-store" });
      if (!response.ok) continue;
      // Shown as an image from a blob: the address holds no secret, and nothing in an SVG image runs.
      const url = URL.createObjectURL(await response.blob());
      img.src = url;
      if (chartUrls[which]) URL.revokeObjectURL(chartUrls[which]);
      chartUrls[which] = url;
      img.dataset.loaded = name;
    } catch (err) {
      // The next refresh tries again.
    }
  }
}

const CONFIRM = {
  pause: (r) => "Pause rollout " + r + "? It holds at its step (the tests keep running) until resumed.",
  resume: (r) => "Resume rollout " + r + "? It goes on from its step (past a gate, to the next step).",
  promote: (r) => "Promote now? The canary of rollout " + r + " becomes stable for every user at once.",
  abort: (r) => "Abort rollout " + r + "? The canary goes to 0 % at once (rolled back).",
};

async function operate(op) {
  const name = chosen;
  if (!name || !window.confirm(CONFIRM[op](name))) return;
  const result = $("action-result");
  result.className = "";
  result.textContent = op + "…";
  try {
    const answer = await api("/v1/rollouts/" + op, { rollout: name });
    const r = answer.rollout;
    result.textContent = op + ": done" + (r ? ", rollout " + r.rollout + " is " + r.phase.replace("_", " ") : "");
  } catch (err) {
    if (err instanceof Unauthorized) { token = null; showLogin("That token was refused."); return; }
    result.className = "bad";
    result.textContent = op + " refused: " + err.message;
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value;
    $("token").value = "";
    $("token").dataset.tried = "1";
    refreshes = 0;
    refresh();
  });
  $("forget").addEventListener("click", () => { token = null; showLogin(""); clearTimeout(timer); });
  for (const b of document.querySelectorAll(".actions button")) {
    b.addEventListener("click", () => operate(b.dataset.op));
  }
  refresh();
});

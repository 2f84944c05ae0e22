"""The live dashboard: one self-contained HTML page and the JSON it polls.

This module owns what an operator sees at ``/dashboard``: ``dashboard_page()`` is plain
HTML with one inline script and one inline style (no build step, nothing fetched from
elsewhere), and ``dashboard_data()`` gathers the numbers the script polls every 2 s from
``/dashboard/data``: robots per status, queue depth, each step's latency against the
seed's budget (``BUDGETS_MS``), the module table, active and recent alerts, the leader,
and, for admins only, the last failed robots (id, kind, module, error type and time;
never a payload or an error message). The script keeps a few minutes of history in the
browser for the "robots per status over time" and per-step latency charts.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Any

from .models import RobotStatus, utcnow
from .performance import OPERATIONS

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["BUDGETS_MS", "CONTENT_SECURITY_POLICY", "dashboard_data", "dashboard_page"]

#: The seed's latency budget per step, in ms (low, high). Module processing is the
#: module's own time and has none; completion is an update of the robot, like progress.
BUDGETS_MS: dict[str, tuple[float, float]] = {
    "security.validate": (5.0, 10.0),
    "balancer.select": (10.0, 15.0),
    "state.create_robot": (20.0, 30.0),
    "state.start_execution": (5.0, 10.0),
    "state.update_progress": (10.0, 15.0),
    "state.complete_robot": (10.0, 15.0),
}

#: failed robots shown to admins
RECENT_FAILURES = 10


async def dashboard_data(orch: Orchestrator, *, include_failures: bool) -> dict[str, Any]:
    """Everything the dashboard shows, as JSON-able data (this process's view, plus the
    store's counts and module records)."""
    counts = await orch.driver.count_robots()
    by_status = {status.value: 0 for status in RobotStatus}
    for (_kind, status), n in counts.items():
        by_status[status] = by_status.get(status, 0) + n
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(counts.items()):
        by_kind.setdefault(kind, {})[status] = n
    depth, oldest = await orch.driver.queue_stats(utcnow())
    snapshot = orch.tracker.snapshot()
    steps = []
    for name in OPERATIONS:
        stats = snapshot.get(name)
        budget = BUDGETS_MS.get(name)
        steps.append({
            "operation": name,
            "count": stats.count if stats else 0,
            "errors": stats.errors if stats else 0,
            "p50_ms": round(stats.p50_ms, 3) if stats else None,
            "p95_ms": round(stats.p95_ms, 3) if stats else None,
            "p99_ms": round(stats.p99_ms, 3) if stats else None,
            "ewma_ms": round(stats.ewma_ms, 3) if stats else None,
            "budget_ms": list(budget) if budget else None,
        })
    if orch.balancer.remote_stale:
        await orch.refresh_modules()
    modules: dict[str, dict[str, Any]] = {}
    for kind in sorted(orch.balancer.known_kinds()):
        for c in orch.balancer.candidates(kind):
            row = modules.setdefault(c.name, {
                "name": c.name, "kinds": [], "health": c.health, "score": c.score,
                "circuit_state": c.circuit_state, "load": c.load, "capacity": c.capacity,
                "success_rate": round(c.success_rate, 4),
                "latency_ewma_ms": None if c.latency_ewma_ms is None
                else round(c.latency_ewma_ms, 3),
                "latency_p95_ms": None if c.latency_p95_ms is None
                else round(c.latency_p95_ms, 3),
                "local": c.name in orch.modules,
            })
            row["kinds"].append(kind)
    background = orch.background
    data: dict[str, Any] = {
        "time": utcnow().isoformat(),
        "robots": {"by_status": by_status, "by_kind": by_kind, "total": sum(counts.values())},
        "queue": {"depth": depth, "oldest_age_seconds": oldest},
        "steps": steps,
        "modules": [modules[name] for name in sorted(modules)],
        "alerts": {
            "active": [a.to_dict() for a in background.alerts.active()],
            "recent": [a.to_dict() for a in reversed(background.alerts.history)],
        },
        "leader": {"leader": background.leader.is_leader, "backend": background.leader.backend},
        "worker": {"running": len(orch.worker.running), "concurrency": orch.worker.concurrency,
                   "completed": orch.worker.completed},
        "cache": {"hit_ratio": orch.cache.stats()["hit_ratio"]},
        "failures": None,
    }
    if include_failures:
        failed = []
        for status in (RobotStatus.FAILED, RobotStatus.TIMED_OUT):
            failed += await orch.state.list_robots(tenant=None, status=status,
                                                   limit=RECENT_FAILURES)
        failed.sort(key=lambda r: r.finished_at or r.updated_at, reverse=True)
        data["failures"] = [
            {"id": r.id, "kind": r.kind, "module": r.module, "status": str(r.status),
             "error_type": r.error.type if r.error else None,
             "finished_at": (r.finished_at or r.updated_at).isoformat()}
            for r in failed[:RECENT_FAILURES]
        ]
    return data


_STYLE = """
:root { --bg:#0f172a; --panel:#111c33; --ink:#e2e8f0; --dim:#94a3b8; --line:#24324f;
        --ok:#22c55e; --warn:#f59e0b; --bad:#ef4444; --band:rgba(34,197,94,.18); }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
       background:var(--bg); color:var(--ink); }
header { display:flex; gap:16px; align-items:baseline; padding:12px 20px;
         border-bottom:1px solid var(--line); }
header h1 { font-size:18px; margin:0; }
header .meta { color:var(--dim); }
main { display:grid; grid-template-columns: 1fr 1fr; gap:14px; padding:14px 20px; }
section { background:var(--panel); border:1px solid var(--line); border-radius:8px;
          padding:10px 14px; min-width:0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size:14px; margin:0 0 8px; color:var(--dim); font-weight:600;
     text-transform:uppercase; letter-spacing:.04em; }
table { width:100%; border-collapse:collapse; font-variant-numeric: tabular-nums; }
th, td { text-align:left; padding:4px 6px; border-bottom:1px solid var(--line);
         white-space:nowrap; }
th { color:var(--dim); font-weight:600; }
.tiles { display:flex; flex-wrap:wrap; gap:8px; }
.tile { flex:1 1 90px; background:#0b1327; border-radius:6px; padding:6px 10px; }
.tile b { display:block; font-size:22px; }
.tile span { color:var(--dim); font-size:12px; }
.steps { display:grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap:10px; }
.step { background:#0b1327; border-radius:6px; padding:6px 8px; }
.step .title { display:flex; flex-wrap:wrap; gap:2px 8px; justify-content:space-between;
               color:var(--dim); font-size:12px; }
#modules, #alerts, #failures { overflow-x:auto; }
.ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); }
.legend span { margin-right:10px; font-size:12px; }
.legend i { display:inline-block; width:10px; height:10px; margin-right:4px; border-radius:2px; }
#error { color:var(--bad); padding:0 20px; }
form { display:inline; } input { background:#0b1327; color:var(--ink);
       border:1px solid var(--line); border-radius:4px; padding:3px 6px; }
svg text { fill: var(--dim); font-size: 10px; }
"""

_SCRIPT = r"""
"use strict";
const COLORS = {pending:"#a78bfa", queued:"#60a5fa", running:"#f59e0b", succeeded:"#22c55e",
                failed:"#ef4444", cancelled:"#94a3b8", timed_out:"#f472b6"};
const HISTORY = 150;  // points kept in the browser: 5 minutes at one poll every 2 s
const points = [];
const stepHistory = {};
const $ = (id) => document.getElementById(id);
const NS = "http://www.w3.org/2000/svg";

function key() {
  const m = /(?:^|[#&])key=([^&]+)/.exec(location.hash);
  if (m) {  // keep the key for this tab only, and out of the address bar
    sessionStorage.setItem("rfmvp-key", decodeURIComponent(m[1]));
    window.history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("rfmvp-key") || "";
}
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmt(ms) {
  if (ms === null || ms === undefined) return "\u2013";
  return ms < 10 ? ms.toFixed(2) + " ms" : ms < 10000 ? ms.toFixed(0) + " ms"
       : (ms / 1000).toFixed(1) + " s";
}
function table(target, headers, rows) {
  const t = el("table"); const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", {}, h)));
  t.appendChild(head);
  rows.forEach((r) => { const tr = el("tr");
    r.forEach((c) => { const td = el("td", c && c.cls ? {class: c.cls} : {},
                                      c && c.text !== undefined ? c.text : c);
                       tr.appendChild(td); });
    t.appendChild(tr); });
  target.replaceChildren(t);
}

function drawStatusChart(data) {
  const w = 560, h = 200, pad = 30;
  const s = svg("svg", {viewBox: `0 0 ${w} ${h}`, width: "100%", role: "img",
                        "aria-label": "robots per status over time"});
  const statuses = Object.keys(COLORS);
  let max = 1;
  points.forEach((p) => statuses.forEach((st) => { max = Math.max(max, p[st] || 0); }));
  const x = (i) => pad + (w - pad - 8) * (points.length < 2 ? 1 : i / (points.length - 1));
  const y = (v) => h - pad + 8 - (h - pad - 8) * (v / max);
  for (let g = 0; g <= 4; g++) {
    const v = Math.round(max * g / 4), yy = y(v);
    s.appendChild(svg("line", {x1: pad, x2: w - 8, y1: yy, y2: yy, stroke: "#24324f"}));
    const t = svg("text", {x: 2, y: yy + 3}); t.textContent = v; s.appendChild(t);
  }
  statuses.forEach((st) => {
    const pts = points.map((p, i) => `${x(i).toFixed(1)},${y(p[st] || 0).toFixed(1)}`);
    if (!pts.length) return;
    s.appendChild(svg("polyline", {points: pts.join(" "), fill: "none", stroke: COLORS[st],
                                   "stroke-width": 2, "data-status": st}));
  });
  $("status-chart").replaceChildren(s);
  const legend = $("status-legend"); legend.replaceChildren();
  statuses.forEach((st) => { const sp = el("span"); const i = el("i");
    i.style.background = COLORS[st]; sp.appendChild(i);
    sp.appendChild(document.createTextNode(`${st} ${data.robots.by_status[st] || 0}`));
    legend.appendChild(sp); });
}

function drawStep(step) {
  const hist = stepHistory[step.operation] || (stepHistory[step.operation] = []);
  hist.push({p50: step.p50_ms, p95: step.p95_ms});
  if (hist.length > HISTORY) hist.shift();
  const w = 260, h = 80, pad = 4;
  const values = hist.flatMap((p) => [p.p50, p.p95]).filter((v) => v !== null);
  const budget = step.budget_ms;
  let max = Math.max(1e-3, ...values, budget ? budget[1] * 1.25 : 0);
  const x = (i) => pad + (w - 2 * pad) * (hist.length < 2 ? 1 : i / (hist.length - 1));
  const y = (v) => h - pad - (h - 2 * pad) * Math.min(1, v / max);
  const s = svg("svg", {viewBox: `0 0 ${w} ${h}`, width: "100%", role: "img",
                        "aria-label": step.operation + " latency"});
  if (budget) {
    s.appendChild(svg("rect", {x: pad, width: w - 2 * pad, y: y(budget[1]),
                               height: Math.max(1, y(budget[0]) - y(budget[1])),
                               fill: "rgba(34,197,94,.18)", "data-budget": budget.join("-")}));
    const t = svg("text", {x: w - pad - 2, y: y(budget[1]) - 2, "text-anchor": "end"});
    t.textContent = `budget ${budget[0]}\u2013${budget[1]} ms`; s.appendChild(t);
  }
  [["p50", "#60a5fa"], ["p95", "#f59e0b"]].forEach(([k, color]) => {
    const pts = hist.filter((p) => p[k] !== null)
                    .map((p) => `${x(hist.indexOf(p)).toFixed(1)},${y(p[k]).toFixed(1)}`);
    if (pts.length) s.appendChild(svg("polyline", {points: pts.join(" "), fill: "none",
                                                   stroke: color, "stroke-width": 2}));
  });
  const box = el("div", {class: "step", "data-operation": step.operation});
  const title = el("div", {class: "title"});
  title.appendChild(el("span", {}, step.operation));
  let cls = "";
  if (budget && step.p95_ms !== null) cls = step.p95_ms <= budget[1] ? "ok" : "warn";
  title.appendChild(el("span", {class: cls},
                       `p50 ${fmt(step.p50_ms)} · p95 ${fmt(step.p95_ms)} · n ${step.count}`));
  box.appendChild(title); box.appendChild(s);
  return box;
}

function render(data) {
  $("error").textContent = "";
  $("updated").textContent = "updated " + new Date(data.time).toLocaleTimeString();
  $("leader").textContent = data.leader.leader ? `leader (${data.leader.backend})`
                                               : `follower (${data.leader.backend})`;
  const point = Object.assign({}, data.robots.by_status);
  points.push(point); if (points.length > HISTORY) points.shift();
  const tiles = $("tiles"); tiles.replaceChildren();
  const add = (label, value) => { const t = el("div", {class: "tile"});
    t.appendChild(el("b", {}, value)); t.appendChild(el("span", {}, label));
    tiles.appendChild(t); };
  add("robots", data.robots.total);
  Object.keys(COLORS).forEach((st) => add(st, data.robots.by_status[st] || 0));
  add("queue depth", data.queue.depth);
  add("oldest queued", data.queue.oldest_age_seconds === null ? "\u2013"
      : data.queue.oldest_age_seconds.toFixed(1) + " s");
  drawStatusChart(data);
  const steps = $("steps"); steps.replaceChildren();
  data.steps.forEach((step) => steps.appendChild(drawStep(step)));
  table($("modules"), ["module", "kinds", "health", "score", "circuit", "load",
                       "success", "EWMA", "p95"],
        data.modules.map((m) => [
          m.name, m.kinds.join(", "),
          {text: m.health, cls: m.health === "healthy" ? "ok"
                               : m.health === "unhealthy" ? "bad" : "warn"},
          m.score.toFixed(3),
          {text: m.circuit_state, cls: m.circuit_state === "closed" ? "ok" : "bad"},
          `${m.load}/${m.capacity}`, (m.success_rate * 100).toFixed(1) + "%",
          fmt(m.latency_ewma_ms), fmt(m.latency_p95_ms)]));
  const alerts = data.alerts.active.length ? data.alerts.active : data.alerts.recent;
  table($("alerts"), ["", "alert", "message", "at"],
        alerts.slice(0, 10).map((a) => [
          {text: a.active ? "ACTIVE" : "ended", cls: a.active ? "bad" : "ok"}, a.key, a.message,
          new Date(a.raised_at).toLocaleTimeString()]));
  if (!alerts.length) $("alerts").textContent = "No alerts.";
  if (data.failures === null) {
    $("failures").textContent = "Shown to admins only.";
  } else if (!data.failures.length) {
    $("failures").textContent = "No failed robots.";
  } else {
    table($("failures"), ["robot", "kind", "module", "status", "error", "finished"],
          data.failures.map((f) => [f.id, f.kind, f.module || "\u2013",
                                    {text: f.status, cls: "bad"}, f.error_type || "\u2013",
                                    new Date(f.finished_at).toLocaleTimeString()]));
  }
}

async function poll() {
  try {
    const headers = {}; const k = key(); if (k) headers["X-API-Key"] = k;
    const resp = await fetch("dashboard/data", {headers, cache: "no-store"});
    if (resp.status === 401 || resp.status === 403) {
      $("error").textContent = "This needs an admin API key: add #key=YOUR_KEY to the URL.";
    } else if (!resp.ok) {
      $("error").textContent = `The server answered ${resp.status}.`;
    } else {
      render(await resp.json());
    }
  } catch (e) {
    $("error").textContent = "Cannot reach the server: " + e;
  }
  setTimeout(poll, 2000);
}
poll();
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>robotframework-mvp dashboard</title>
<style>{style}</style>
</head>
<body>
<header><h1>robotframework-mvp</h1><span class="meta" id="leader"></span>
<span class="meta" id="updated">loading…</span></header>
<div id="error"></div>
<main>
<section class="wide"><h2>Robots</h2><div class="tiles" id="tiles"></div></section>
<section><h2>Robots per status over time</h2><div id="status-chart"></div>
<div class="legend" id="status-legend"></div></section>
<section><h2>Modules</h2><div id="modules">\u2013</div></section>
<section class="wide"><h2>Latency per step (p50 blue, p95 amber, budget green)</h2>
<div class="steps" id="steps"></div></section>
<section><h2>Alerts</h2><div id="alerts">\u2013</div></section>
<section><h2>Recent failures</h2><div id="failures">\u2013</div></section>
</main>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


#: Only this page's own inline script and style may run; data comes from this origin.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src 'sha256-{_sha256(_SCRIPT)}'; "
    f"style-src 'sha256-{_sha256(_STYLE)}'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def dashboard_page() -> str:
    """The dashboard's HTML (the same for everyone: it holds no data)."""
    return _BODY.format(style=_STYLE, script=_SCRIPT)

// tollway's public page: models and prices, a model's upstreams with live figures, rankings.
// Everything comes from the public JSON API; text is set with textContent (model names may come
// from an imported catalogue), never as HTML.
"use strict";

const REFRESH_MS = 10000;
let selected = null;

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function perMillion(usdPerToken) {
  const v = Number(usdPerToken) * 1e6;
  return Number.isFinite(v) ? "$" + (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toPrecision(2)) : "—";
}

function perCall(usd) {
  const v = Number(usd);
  return v > 0 ? "$" + v.toPrecision(2) : "—";
}

function percent(v) {
  return v === null || v === undefined ? "—" : v.toFixed(v >= 99.95 || v === 0 ? 0 : 1) + "%";
}

function seconds(v) {
  return v === null || v === undefined ? "—" : v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(2) + " s";
}

async function getJSON(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(path + " answered " + r.status);
  return r.json();
}

function renderModels(models) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren();
  for (const m of models) {
    const row = document.createElement("tr");
    row.dataset.model = m.id;
    if (m.id === selected) row.className = "selected";
    const label = m.name && m.name !== m.id ? m.name + " (" + m.id + ")" : m.id;
    const name = cell(row, m.free ? label + " · free" : label);
    name.title = m.id;
    cell(row, perMillion(m.pricing.prompt));
    cell(row, perMillion(m.pricing.completion));
    cell(row, perMillion(m.pricing.input_cache_read));
    cell(row, perCall(m.pricing.request));
    cell(row, m.max_completion_tokens ? m.max_completion_tokens.toLocaleString() : "—");
    row.addEventListener("click", () => select(m.id));
    body.appendChild(row);
  }
  for (const el of document.querySelectorAll(".first-model")) el.textContent = models.length ? models[0].id : "…";
  const offers = new Set();
  for (const m of models) for (const p of m.payment || []) offers.add(p.scheme + " on " + p.network);
  document.getElementById("payment").textContent = [...offers].join(", ") || "—";
}

async function select(model) {
  selected = model;
  for (const row of document.querySelectorAll("#models tbody tr")) {
    row.className = row.dataset.model === model ? "selected" : "";
  }
  await refreshEndpoints();
}

async function refreshEndpoints() {
  if (!selected) return;
  const doc = await getJSON("/v1/models/" + selected.split("/").map(encodeURIComponent).join("/") + "/endpoints");
  document.getElementById("endpoints-model").textContent = doc.data.id;
  const body = document.querySelector("#endpoints tbody");
  body.replaceChildren();
  for (const e of doc.data.endpoints) {
    const row = document.createElement("tr");
    row.dataset.upstream = e.provider_name;
    cell(row, e.provider_name);
    cell(row, e.status === "ok" ? "ok" : "cooling down", e.status);
    cell(row, percent(e.uptime_last_5m));
    cell(row, percent(e.uptime_last_30m));
    cell(row, percent(e.uptime_last_1d));
    const lat = e.latency_last_30m;
    cell(row, lat ? seconds(lat.p50) + " / " + seconds(lat.p90) : "—");
    const tput = e.throughput_last_30m;
    cell(row, tput ? tput.p50.toFixed(0) + " tok/s" : "—");
    const added = e.gateway_added_ms_last_30m;
    cell(row, added ? added.p50.toFixed(1) + " ms" : "—");
    cell(row, String(e.calls_last_30m));
    cell(row, e.cache_hit_rate_last_30m === null ? "—" : percent(100 * e.cache_hit_rate_last_30m));
    body.appendChild(row);
  }
  document.getElementById("endpoints-section").hidden = false;
}

function renderRankings(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  rows.forEach((r, i) => {
    const row = document.createElement("tr");
    cell(row, String(i + 1));
    cell(row, r.model);
    cell(row, r.calls.toLocaleString());
    cell(row, r.tokens.toLocaleString());
    const share = cell(row, "");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(r.token_share * 80)) + "px";
    share.append(bar, (100 * r.token_share).toFixed(1) + "%");
    body.appendChild(row);
  });
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [models, rankings, health] = await Promise.all([
      getJSON("/v1/models"),
      getJSON("/v1/rankings"),
      getJSON("/healthz").catch(() => ({ ok: false })),
    ]);
    renderModels(models.data);
    renderRankings("rankings-day", rankings.windows.day);
    renderRankings("rankings-week", rankings.windows.week);
    await refreshEndpoints();
    status.className = "status";
    status.textContent = (health.ok ? "Serving" : "Degraded") + " · " + models.data.length + " models · updated " +
      new Date().toLocaleTimeString();
  } catch (err) {
    status.className = "status error";
    status.textContent = "Could not load: " + err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll(".base")) el.textContent = location.origin;
  refresh();
  setInterval(refresh, REFRESH_MS);
});

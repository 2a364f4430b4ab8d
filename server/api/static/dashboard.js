// The live dashboard: polls /dashboard/stats every second and writes the numbers into the page.
// Every element with data-stat="a.b.c" shows that field of the stats, formatted by its data-format; its raw number is
// kept in data-value. Tokens/s is the rise of tokens.generated over the last RATE_WINDOW_S seconds of server time.
// Text from the server goes in with textContent only, never as HTML.
"use strict";

const STATS_URL = "/dashboard/stats";
const REFRESH_MS = 1000;
const RATE_WINDOW_S = 5;
const SPARKLINE_POINTS = 60;
const KEY_STORAGE = "inflight-api-key";

const history = [];  // {time, generated}: one per refresh, oldest first
let refreshes = 0;

function field(stats, path) {
  return path.split(".").reduce((value, key) => (value == null ? undefined : value[key]), stats);
}

function format(value, kind) {
  if (value == null) return "–";
  switch (kind) {
    case "text": return String(value);
    case "int": return Math.round(value).toLocaleString("en-US");
    case "percent": return (100 * value).toFixed(1) + " %";
    case "ms": return value < 1 ? (1000 * value).toFixed(1) + " ms" : value.toFixed(2) + " s";
    case "rate": return value.toLocaleString("en-US", {maximumFractionDigits: 1});
    default: return String(value);
  }
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString("en-GB");  // 24-hour HH:MM:SS, the browser's time zone
}

function showStats(stats) {
  for (const element of document.querySelectorAll("[data-stat]")) {
    let value = field(stats, element.dataset.stat);
    if (element.dataset.format === "sum" && value != null) {
      value = Object.values(value).reduce((a, b) => a + b, 0);
      element.textContent = format(value, "int");
    } else {
      element.textContent = format(value, element.dataset.format);
    }
    element.dataset.value = value == null ? "" : String(value);
  }
  document.getElementById("kv-bar").style.width = (100 * stats.kv_cache.usage_ratio).toFixed(1) + "%";
  showRate(stats);
  showErrors(stats.errors.recent);
  const health = document.getElementById("health");
  health.textContent = stats.engine_healthy ? "engine healthy" : "engine not running";
  health.className = "badge " + (stats.engine_healthy ? "ok" : "bad");
  const updated = document.getElementById("updated");
  refreshes += 1;
  updated.textContent = clock(stats.time);
  updated.dataset.refreshes = String(refreshes);
  updated.dataset.time = String(stats.time);
}

function showRate(stats) {
  history.push({time: stats.time, generated: stats.tokens.generated});
  if (history.length > SPARKLINE_POINTS + 1) history.shift();
  const last = history[history.length - 1];
  const first = history.find((sample) => last.time - sample.time <= RATE_WINDOW_S + 0.5) || last;
  const element = document.getElementById("tokens-per-second");
  if (first === last) {
    element.textContent = "–";
    element.dataset.value = "";
  } else {
    const rate = (last.generated - first.generated) / (last.time - first.time);
    element.textContent = format(rate, "rate");
    element.dataset.value = String(rate);
    element.dataset.fromTime = String(first.time);
    element.dataset.fromTokens = String(first.generated);
  }
  drawSparkline();
}

function drawSparkline() {
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const seconds = history[i].time - history[i - 1].time;
    rates.push(seconds > 0 ? (history[i].generated - history[i - 1].generated) / seconds : 0);
  }
  const top = Math.max(1, ...rates);
  const step = 300 / Math.max(1, rates.length - 1);  // across the width; a minute once SPARKLINE_POINTS are in
  const points = rates.map((rate, i) => (step * i).toFixed(1) + "," + (58 - (56 * rate) / top).toFixed(1));
  document.getElementById("sparkline-line").setAttribute("points", points.join(" "));
}

function showErrors(recent) {
  const body = document.getElementById("errors-body");
  const rows = recent.map((error) => {
    const row = document.createElement("tr");
    const message = error.message == null ? "(hidden: the dashboard is open; start with --protect-metrics)"
                                          : error.message;
    const cells = [clock(error.time), String(error.status),
                   error.method + " " + error.path, error.code || error.type || "", message];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    row.title = error.request_id || "";
    row.className = error.status >= 500 ? "server-error" : "client-error";
    return row;
  });
  if (rows.length === 0) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 5;
    cell.className = "muted";
    cell.textContent = "no errors";
    row.appendChild(cell);
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

function askForKey(refused) {
  document.getElementById("key-reason").textContent = refused
    ? "The server refused this API key; enter another one."
    : "This server needs an API key for its metrics (--api-key with --protect-metrics).";
  document.getElementById("key-form").hidden = false;
  const health = document.getElementById("health");
  health.textContent = "API key needed";
  health.className = "badge bad";
}

async function refresh() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = key ? {Authorization: "Bearer " + key} : {};
  try {
    const response = await fetch(STATS_URL, {headers, cache: "no-store"});
    if (response.status === 401) {
      askForKey(Boolean(key));
      return;  // polling starts again when a key is entered
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    showStats(await response.json());
  } catch (error) {
    const health = document.getElementById("health");
    health.textContent = "server unreachable (" + error.message + ")";
    health.className = "badge bad";
  }
  setTimeout(refresh, REFRESH_MS);
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, document.getElementById("key-input").value.trim());
  document.getElementById("key-form").hidden = true;
  refresh();
});

refresh();

// kvtier's status page: polls the daemon's JSON routes about once a second and redraws.
// Hand-written, no dependencies; every value is put in with textContent (nothing parsed as HTML).
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "kvtier-api-key";
const SOURCE_NAMES = {ram: "RAM", disk: "SSD", shared: "Shared store", computed: "Computed (prefill)"};

// ---- formatting: numbers always with their unit --------------------------------------
function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : String(n)) + " " + units[i];
}
const tokens = n => n == null ? "—" : Math.round(n).toLocaleString("en-US") + " tok";
const seconds = s => s == null ? "—" : s < 120 ? s.toFixed(s < 10 ? 2 : 1) + " s" :
  s < 7200 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h";
const percent = (part, whole) => whole ? (100 * part / whole).toFixed(1) + " %" : "—";
function ago(epochSeconds) {
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  return s < 60 ? Math.round(s) + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" :
    s < 172800 ? (s / 3600).toFixed(1) + " h ago" : Math.round(s / 86400) + " d ago";
}

// ---- DOM helpers -----------------------------------------------------------------------
const $ = id => document.getElementById(id);
const shortName = model => model.split("/").filter(Boolean).pop() || model;  // a path's last part
function cell(text, opts = {}) {
  const td = document.createElement(opts.header ? "th" : "td");
  if (opts.header) td.scope = "row";
  if (opts.number) td.className = "number";
  if (opts.value != null) td.dataset.value = opts.value;
  if (text instanceof Node) td.append(text); else td.textContent = text;
  return td;
}
function row(cells, id) {
  const tr = document.createElement("tr");
  if (id) tr.id = id;
  tr.append(...cells);
  return tr;
}
function fill(tbody, rows, empty, columns) {
  if (!rows.length) rows = [row([Object.assign(cell(empty), {colSpan: columns})])];
  tbody.replaceChildren(...rows);
}
function facts(dl, pairs) {
  const items = [];
  for (const [term, value, cls, id] of pairs) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    if (cls) dd.className = cls;
    if (id) dd.id = id;
    items.push(dt, dd);
  }
  dl.replaceChildren(...items);
}

// ---- the API key (--api-key) -------------------------------------------------------------
class NeedsKey extends Error {}

async function api(path, init = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = Object.assign({}, init.headers || {});
  if (key) headers["Authorization"] = "Bearer " + key;
  const reply = await fetch(path, Object.assign({}, init, {headers}));
  if (reply.status === 401) throw new NeedsKey();
  const body = await reply.json();
  if (!reply.ok) throw new Error((body.error && body.error.message) || reply.statusText);
  return body;
}

function askForKey(wrong) {
  $("status").hidden = true;
  $("key-form").hidden = false;
  $("summary").textContent = "API key needed";
  $("key-error").textContent = wrong ? "That key was refused." : "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value);
  $("key-input").value = "";
  $("key-form").hidden = true;
  poll();
});

// ---- drawing -----------------------------------------------------------------------------
function drawSummary(health, stats, status) {
  const rate = stats.state === "loaded" ? stats.hit_rate : (stats.on_disk || {}).hit_rate;
  const parts = [shortName(stats.model || health.model), "up " + seconds(status.uptime_seconds),
                 "cache hit rate " + (rate == null ? "—" : (100 * rate).toFixed(1) + " %")];
  $("summary").textContent = parts.join(" · ");
}

function drawSaved(status) {
  const t = status.tokens;
  const cached = t.ram + t.disk + t.shared, total = cached + t.computed;
  const rate = status.prefill_tokens_per_second;
  $("saved-summary").textContent = status.seconds_saved == null
    ? "Seconds saved: not measured yet (no prompt computed so far)."
    : `About ${seconds(status.seconds_saved)} of prefill saved since start: ${tokens(cached)} from the cache, ` +
      `at the measured prefill rate of ${Math.round(rate).toLocaleString("en-US")} tok/s.`;
  $("saved-summary").dataset.value = status.seconds_saved == null ? "" : status.seconds_saved;
  const rows = Object.keys(SOURCE_NAMES).map(source => row([
    cell(SOURCE_NAMES[source], {header: true}),
    cell(tokens(t[source]), {number: true, value: t[source]}),
    cell(percent(t[source], total), {number: true})], "source-" + source));
  rows.push(row([cell("From the cache", {header: true}), cell(tokens(cached), {number: true, value: cached}),
                 cell(percent(cached, total), {number: true})], "source-cached"));
  fill($("sources"), rows);
  drawChart(status.series);
}

function drawChart(series) {
  const svg = $("chart"), ns = "http://www.w3.org/2000/svg";
  const bars = [];
  for (let i = 1; i < series.length; i++) {
    const was = series[i - 1], now = series[i];
    const cached = (now.ram - was.ram) + (now.disk - was.disk) + (now.shared - was.shared);
    bars.push({cached: Math.max(0, cached), computed: Math.max(0, now.computed - was.computed)});
  }
  const most = Math.max(1, ...bars.map(b => b.cached + b.computed));
  const slots = Math.max(bars.length, 60), width = 600 / slots, shapes = [];
  bars.forEach((bar, i) => {
    i += slots - bars.length;  // the newest at the right edge
    let y = 140;
    for (const kind of ["cached", "computed"]) {
      const h = 135 * bar[kind] / most;
      if (h <= 0) continue;
      const rect = document.createElementNS(ns, "rect");
      y -= h;
      rect.setAttribute("class", kind);
      for (const [name, value] of [["x", i * width], ["y", y], ["width", width * 0.85], ["height", h]])
        rect.setAttribute(name, value.toFixed(2));
      shapes.push(rect);
    }
  });
  svg.replaceChildren(...shapes);
}

function drawTiers(stats) {
  if (stats.state !== "loaded") return drawUnloadedTiers(stats);
  const ram = stats.ram, disk = stats.disk, shared = stats.shared;
  const hot = ram.bytes + (stats.live ? stats.live.bytes : 0);
  const used = (n, budget) => {
    const span = document.createElement("span");
    span.textContent = bytes(n) + " ";
    if (budget) {
      const meter = document.createElement("meter");
      meter.max = budget; meter.value = Math.min(n, budget); meter.high = budget * 0.9;
      meter.textContent = percent(n, budget);
      meter.title = percent(n, budget) + " of the budget";
      span.append(meter);
    }
    return span;
  };
  const rows = [
    row([cell("RAM", {header: true}), cell(used(hot, ram.budget), {value: hot}), cell(bytes(ram.budget)),
         cell(String(ram.entries), {number: true})], "tier-ram"),
    row([cell("SSD", {header: true}), cell(used(disk.bytes, disk.budget), {value: disk.bytes}),
         cell(disk.budget ? bytes(disk.budget) : "no limit"), cell(String(disk.entries), {number: true})], "tier-disk"),
  ];
  if (shared) rows.push(row([cell("Shared store", {header: true}),
    cell(shared.connected ? "connected" : "unreachable"), cell("expires after " + seconds(shared.ttl_seconds)),
    cell("—")], "tier-shared"));
  fill($("tiers"), rows);
  const c = stats.counters;
  const evictions = Object.keys(c).filter(name => name.includes("evict")).map(name => [name.replace(/_/g, " "), String(c[name])]);
  facts($("tier-facts"), [
    ["Write queue", `${disk.queued_jobs} writes, ${bytes(disk.queued_bytes)}`, null, "write-queue"],
    ["RAM waiting for its write", bytes(ram.pending_bytes)],
    ...(shared ? [["Upload queue", `${shared.queued_uploads} uploads, ${bytes(shared.queued_bytes)}`]] : []),
    ...(evictions.length ? evictions : [["Evictions", "0"]]),
  ]);
}

// A model that is not loaded has no tiers of its own in memory: what the SSD holds of it.
function drawUnloadedTiers(stats) {
  const disk = stats.on_disk;
  fill($("tiers"), disk ? [row([cell("SSD", {header: true}), cell(bytes(disk.bytes), {value: disk.bytes}),
                                cell("shared by the models"), cell(String(disk.blocks + disk.snapshots), {number: true})],
                               "tier-disk")] : [], `${shortName(stats.model)} is ${stats.state}.`, 4);
  facts($("tier-facts"), [["Model", `${stats.state}: its blocks stay on the SSD; a request loads it again`]]);
}

function drawModels(health) {
  const models = Object.values(health.models || {});
  $("models-note").textContent = `The numbers above are ${shortName(selectedName(health))}'s.`;
  fill($("models"), models.map(m => {
    const button = document.createElement("button");
    const shown = m.name === selectedName(health);
    button.type = "button";
    button.textContent = shown ? "Shown" : "Show";
    button.disabled = shown;
    button.setAttribute("aria-label", `Show ${shortName(m.name)}'s numbers`);
    button.addEventListener("click", () => { selected = m.name; poll(); });
    const tr = row([
      Object.assign(cell(shortName(m.name) + (m.default ? " (default)" : ""), {header: true}), {title: m.name}),
      cell(m.state + (m.phase ? ` (${m.phase})` : "") + (m.pinned ? ", pinned" : "") + (m.error ? ": " + m.error : ""),
           {value: m.state}),
      cell(bytes(m.weight_bytes), {number: true, value: m.weight_bytes}),
      cell(bytes(m.hot_bytes), {number: true, value: m.hot_bytes}),
      cell(String(m.loads), {number: true}),
      cell(seconds(m.load_seconds), {number: true}), cell(button)]);
    tr.dataset.model = m.name;
    if (shown) tr.className = "selected";
    return tr;
  }), "No model configured.", 7);
}

function drawRequests(health, status) {
  const b = health.batching;
  $("batching").textContent = `Batching: ${b.mode} (${b.running} running, up to ${b.max_batch}); ` +
    `${status.waiting} waiting in the queue.`;
  fill($("requests"), status.requests.map(r => row([
    Object.assign(cell(shortName(r.model)), {title: r.model}), cell(r.phase),
    cell(tokens(r.prompt_tokens), {number: true}),
    cell(tokens(r.cached_tokens), {number: true}),
    cell(tokens(r.completion_tokens), {number: true}),
    cell(r.tokens_per_second == null ? "—" : r.tokens_per_second.toFixed(1) + " tok/s", {number: true}),
  ], "request-" + r.id)), "No request in flight.", 6);
}

function drawConversations(entries) {
  fill($("conversations"), entries.data.map(e => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = e.pinned ? "Unpin" : "Pin";
    button.setAttribute("aria-label", `${button.textContent} ${e.key.slice(0, 12)}`);
    button.addEventListener("click", () => act(() => api(e.pinned ? "/cache/unpin" : "/cache/pin",
      {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({key: e.key})}),
      (e.pinned ? "Unpinned " : "Pinned ") + e.key.slice(0, 12)));
    const tr = row([
      cell(e.key.slice(0, 12), {header: true}), cell(tokens(e.tokens), {number: true, value: e.tokens}),
      cell(bytes(e.bytes), {number: true}), cell(ago(e.last_used)), cell(e.tier),
      cell(e.pinned ? "yes" : "no"), cell(button)]);
    tr.dataset.key = e.key;
    return tr;
  }), "Nothing cached yet.", 7);
}

function drawHealth(health, stats, status) {
  const p = stats.prefetch, mem = status.memory, c = stats.counters || {};
  const prefetch = !p ? "none at this start" : p.done
    ? `done: ${p.entries} entries, ${bytes(p.bytes)}${p.seconds == null ? "" : " in " + seconds(p.seconds)}`
    : `${p.entries} of ${p.planned} entries read (${bytes(p.bytes)})`;
  facts($("health"), [
    ["Status", health.status],
    ["Disk writable", health.disk_writable ? "yes" : "no: " + health.disk_error,
     health.disk_writable ? "good" : "bad", "disk-writable"],
    ...(stats.shared ? [["Shared store", stats.shared.connected ? "connected" : "unreachable: " + stats.shared.error]] : []),
    ["Prefetch after start", prefetch],
    ["Memory", `${bytes(mem.available_bytes)} free; spills below ${bytes(mem.pressure_below_bytes)}` +
      (mem.under_pressure ? " (under pressure)" : ""), mem.under_pressure ? "bad" : null],
    ["Memory pressure spills", String(c.memory_pressure_events || 0)],
    ["Damaged blocks met", String(c.damaged_blocks || 0), c.damaged_blocks ? "bad" : null, "damaged"],
    ["Access", (health.access.loopback_only ? "this machine only" : "network") +
      (health.access.api_key ? ", API key required" : "")],
  ]);
}

// ---- actions -----------------------------------------------------------------------------
async function act(call, done) {
  try {
    await call();
    $("action-result").textContent = done;
  } catch (error) {
    $("action-result").textContent = error instanceof NeedsKey ? "API key refused" : "Failed: " + error.message;
  }
  poll();
}

$("purge").addEventListener("click", () => {
  if (!confirm("Purge the whole cache, pinned conversations included? This cannot be undone.")) return;
  act(() => api("/cache?all=true", {method: "DELETE"}), "Cache purged");
});

// ---- polling -----------------------------------------------------------------------------
let timer = null;
let selected = null;  // the model whose numbers are shown; null: the default model

function selectedName(health) {
  return selected && health.models && health.models[selected] ? selected : health.model;
}

async function poll() {
  clearTimeout(timer);
  try {
    const health = await api("/health");
    const model = selectedName(health);
    const query = model && model !== health.model ? "?model=" + encodeURIComponent(model) : "";
    const [stats, status, entries] = await Promise.all(
      [api("/cache/stats" + query), api("/status"), api("/cache/entries?limit=50")]);
    $("status").hidden = false;
    drawSummary(health, stats, status);
    drawSaved(status);
    drawTiers(stats);
    drawModels(health);
    drawRequests(health, status);
    drawConversations(entries);
    drawHealth(health, stats, status);
  } catch (error) {
    if (error instanceof NeedsKey) {
      askForKey(sessionStorage.getItem(KEY_STORE) !== null);
      return;  // polling resumes once a key is given
    }
    $("summary").textContent = "daemon not ready: " + error.message;
  }
  timer = setTimeout(poll, POLL_MS);
}

poll();

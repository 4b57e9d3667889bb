// fieldlink hub dashboard. Reads the devices and their history from the
// REST API (charts, timeline and lateness come downsampled from
// /api/devices/{d}/history?range=), then stays live over server-sent events
// (/api/stream); a live change re-reads the card's history at most every
// REFRESH_MS. With FLEET_MIN devices or more, a sortable, searchable fleet
// table shows and only the opened card is loaded. No
// framework and no build step; the element hooks are listed in index.html.
// Everything from the network is written with textContent, never as HTML.
'use strict';

const BUTTON_EVENTS = 50; // rows per button log
const COMMANDS = 20;      // rows per command history
const ERRORS = 20;        // rows per error log
const POLL_MS = 2000;     // re-reading a pending command
const POLL_TRIES = 90;    // ... for at most 3 minutes
const REFRESH_MS = 3000;  // a live change re-reads the card's history at most this often
const FLEET_MIN = 7;      // from this many devices on, the fleet table shows
const RANGES = ['1h', '24h', '7d'];

const devices = new Map(); // device id -> Device (below)
const pending = new Map(); // command id -> relay row element
let range = RANGES.includes(localStorage.getItem('fieldlink.range')) ? localStorage.getItem('fieldlink.range') : '1h';
const fleet = { sort: 'name', dir: 1, query: '', open: null };

// --- helpers -------------------------------------------------------------

const $ = (root, sel) => root.querySelector(sel);
const enc = encodeURIComponent;

// fetch() for the API: JSON in and out; a 401 means the token is gone.
async function api(path, options = {}) {
  const headers = Object.assign({ Accept: 'application/json' }, options.headers);
  const res = await fetch(path, Object.assign({}, options, { headers, credentials: 'same-origin' }));
  if (res.status === 401) {
    location.href = '/login';
    throw new Error('signed out');
  }
  let body = null;
  try { body = await res.json(); } catch (_) { /* no JSON body */ }
  return { status: res.status, body };
}

async function getJson(path) {
  const { status, body } = await api(path);
  if (status !== 200) throw new Error((body && body.error) || `HTTP ${status} for ${path}`);
  return body;
}

function bytes(n) {
  if (n == null) return '?';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s == null) return '?';
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  return `${m} min`;
}

function ago(ts) {
  if (!ts) return 'never';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  const rel = s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago`
    : s < 86400 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} d ago`;
  return `${new Date(ts).toLocaleString()} (${rel})`;
}

const clock = (ts) => new Date(ts).toLocaleTimeString();
const stamp = (ts) => (range === '1h' ? clock(ts) : new Date(ts).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' }));

function ms(n) {
  if (n == null) return '?';
  if (n < 1000) return `${n} ms`;
  if (n < 60000) return `${(n / 1000).toFixed(1)} s`;
  if (n < 3600000) return `${(n / 60000).toFixed(1)} min`;
  return `${(n / 3600000).toFixed(1)} h`;
}

function li(dataset, parts) {
  const el = document.createElement('li');
  Object.assign(el.dataset, dataset);
  for (const [cls, text, ts] of parts) {
    const part = document.createElement(ts ? 'time' : 'span');
    if (cls) part.className = cls;
    if (ts) part.dateTime = ts;
    part.textContent = text;
    el.append(part);
  }
  return el;
}

function emptyRow(text) {
  const el = document.createElement('li');
  el.className = 'empty';
  el.textContent = text;
  return el;
}

// A message's identity is (epoch, seq): seqs restart under a greater epoch
// when a device lost its seq counter. Epochs are unix ms, exact in a number.
// Merges two lists of {epoch, seq} into one, oldest first, each message once.
function mergeByIdentity(a, b) {
  const byId = new Map();
  for (const x of a.concat(b)) byId.set(`${x.epoch}:${x.seq}`, x);
  return [...byId.values()].sort((x, y) => (x.epoch - y.epoch) || (x.seq - y.seq));
}

// --- devices ---------------------------------------------------------------

// Device: { id, card, online, lastSeen, outbox, history (HistoryView), buttons: [{epoch, seq, ts, name, state}],
//          sensors: {name -> {value, unit, ts}}, refresh (timer) }
function device(id) {
  let dev = devices.get(id);
  if (dev) return dev;
  const card = document.getElementById('device-card').content.firstElementChild.cloneNode(true);
  card.dataset.device = id;
  $(card, '.name').textContent = id;
  dev = { id, card, online: false, lastSeen: null, outbox: null, history: null, buttons: [], sensors: {}, refresh: null };
  devices.set(id, dev);
  // Keep the cards in name order.
  const list = document.getElementById('devices');
  const after = [...list.children].find((c) => c.dataset.device > id);
  list.insertBefore(card, after || null);
  document.getElementById('no-devices').hidden = true;
  return dev;
}

function showView(view) {
  const dev = device(view.device);
  setOnline(dev, view.online);
  setLastSeen(dev, view.last_seen);
  if (view.heartbeat) showHeartbeat(dev, view.heartbeat);
  for (const [name, state] of Object.entries(view.relays || {})) setRelayState(dev, name, state);
  setSetAside(dev, view.set_aside);
  dev.sensors = view.sensors || {};
}

// Messages the hub set aside (refused, never stored): shown only when there are any.
function setSetAside(dev, count) {
  const n = typeof count === 'number' ? count : 0;
  const dd = $(dev.card, '[data-set-aside]');
  dd.dataset.count = String(n);
  dd.textContent = `${n} message${n === 1 ? '' : 's'} not stored (see /api/set-aside)`;
  dd.hidden = n === 0;
  $(dev.card, '[data-set-aside-label]').hidden = n === 0;
}

function setOnline(dev, online) {
  dev.online = !!online;
  const badge = $(dev.card, '[data-online]');
  badge.dataset.online = String(!!online);
  badge.textContent = online ? 'online' : 'offline';
}

function setLastSeen(dev, ts) {
  dev.lastSeen = ts || dev.lastSeen;
  $(dev.card, '[data-last-seen]').textContent = ago(dev.lastSeen);
}

function showHeartbeat(dev, hb) {
  const parts = [`at ${clock(hb.ts)}`, `up ${duration(hb.uptime_s)}`];
  const num = (v) => typeof v === 'number';
  if (num(hb.cpu_percent)) parts.push(`CPU ${hb.cpu_percent.toFixed(0)} %`);
  if (num(hb.load_1m)) parts.push(`load ${hb.load_1m.toFixed(2)}`);
  parts.push(`mem ${bytes(hb.mem_used_bytes)} / ${bytes(hb.mem_total_bytes)}`);
  parts.push(`disk ${bytes(hb.disk_free_bytes)} free`);
  if (num(hb.temp_c)) parts.push(`${hb.temp_c.toFixed(1)} °C`);
  if (hb.version) parts.push(`v${hb.version}`);
  $(dev.card, '[data-heartbeat]').textContent = parts.join(' · ');
  const outbox = hb.outbox || {};
  dev.outbox = typeof outbox.depth === 'number' ? outbox.depth : null;
  $(dev.card, '[data-outbox-depth]').textContent = outbox.depth ?? '–';
  $(dev.card, '.outbox-more').textContent = `(${bytes(outbox.bytes)}, ${outbox.dropped ?? 0} dropped)`;
}

// --- relays ------------------------------------------------------------------

function relayRow(dev, name) {
  const list = $(dev.card, '.relays');
  let row = [...list.querySelectorAll('[data-relay]')].find((r) => r.dataset.relay === name);
  if (row) return row;
  const none = $(list, '.none');
  if (none) none.remove();
  row = document.getElementById('relay-row').content.firstElementChild.cloneNode(true);
  row.dataset.relay = name;
  $(row, '.relay-name').textContent = name;
  for (const button of row.querySelectorAll('button[data-action]')) {
    button.addEventListener('click', () => sendCommand(dev, name, button.dataset.action, row));
  }
  const after = [...list.children].find((r) => r.dataset.relay > name);
  list.insertBefore(row, after || null);
  return row;
}

function setRelayState(dev, name, state) {
  const row = relayRow(dev, name);
  row.dataset.state = state;
  $(row, '[data-relay-state]').textContent = state;
}

function setCommand(row, status, text) {
  const el = $(row, '[data-command-status]');
  el.dataset.status = status;
  el.textContent = text;
}

async function sendCommand(dev, name, state, row) {
  const buttons = row.querySelectorAll('button');
  for (const b of buttons) b.disabled = true; // while the hub waits for the device
  delete row.dataset.commandId;
  setCommand(row, 'pending', 'pending…');
  try {
    const { status, body } = await api(`/api/devices/${enc(dev.id)}/relays/${enc(name)}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ state }),
    });
    if (body && body.command_id) row.dataset.commandId = body.command_id;
    if (status === 200 || status === 409) {
      settle(row, body);
    } else if (status === 202) {
      pending.set(body.command_id, row); // settled by the stream, or by poll()
      poll(body.command_id);
    } else {
      setCommand(row, 'failed', `failed: ${(body && body.error) || 'HTTP ' + status}`);
    }
  } catch (e) {
    setCommand(row, 'failed', `failed: ${e.message}`);
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// Shows a final answer: a POST's 200/409 body, or a command row
// (GET /api/commands/{id} or a live "command" event).
function settle(row, answer) {
  pending.delete(answer.command_id);
  if (row.dataset.commandId !== answer.command_id) return; // a newer command is out
  if (answer.status === 'confirmed') {
    const state = answer.state || answer.requested;
    setCommand(row, 'confirmed', `confirmed: ${state}`);
    if (state === 'on' || state === 'off') {
      row.dataset.state = state;
      $(row, '[data-relay-state]').textContent = state;
    }
  } else if (answer.status === 'rejected') {
    setCommand(row, 'rejected', `rejected: ${answer.error || 'refused by the device'}`);
  } else if (answer.status === 'expired') {
    setCommand(row, 'expired', 'expired: no answer from the device');
  }
}

// The live stream usually settles a pending command; this is the fallback
// when it is down.
async function poll(id) {
  for (let i = 0; i < POLL_TRIES && pending.has(id); i++) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    if (!pending.has(id)) return;
    try {
      const cmd = await getJson(`/api/commands/${enc(id)}`);
      const row = pending.get(id);
      if (row && cmd.status !== 'requested') settle(row, cmd);
    } catch (_) { /* try again */ }
  }
}

// --- button log, commands, errors ------------------------------------------------

function showButtons(dev) {
  const rows = dev.buttons.slice(-BUTTON_EVENTS).reverse().map((b) =>
    li({ seq: b.seq, button: b.name, state: b.state }, [[null, clock(b.ts), b.ts], ['what', `${b.name} ${b.state}`]]));
  if (!rows.length) rows.push(emptyRow('No button events yet.'));
  $(dev.card, '[data-button-log]').replaceChildren(...rows);
}

const buttonOf = (e) => ({
  epoch: e.epoch ?? 0, seq: e.seq, ts: e.ts, name: e.name || e.payload.button, state: e.payload.state,
});

function showCommands(dev, commands) {
  const rows = commands.map((c) => {
    const answer = c.status === 'confirmed' ? `confirmed ${c.state || ''}`.trim()
      : c.status === 'rejected' ? `rejected: ${c.error || 'refused'}`
      : c.status === 'expired' ? 'expired: no answer' : 'requested…';
    const when = c.answered_at ? ` (answered ${clock(c.answered_at)})` : '';
    const by = [c.requested_by || 'unknown', c.client].filter(Boolean).join(' from ');
    return li({ commandId: c.command_id, status: c.status }, [
      [null, stamp(c.requested_at), c.requested_at],
      ['what', `${c.relay} ${c.requested} → ${answer}${when}`],
      ['by', `by ${by}`],
    ]);
  });
  if (!rows.length) rows.push(emptyRow('No commands yet.'));
  $(dev.card, '[data-command-log]').replaceChildren(...rows);
  for (const el of $(dev.card, '[data-command-log]').querySelectorAll('.by')) el.dataset.by = '';
}

function showErrors(dev, errors) {
  const rows = errors.map((e) => li({ seq: e.seq, code: e.payload.code || '' }, [
    [null, stamp(e.ts), e.ts],
    ['what', `${e.payload.code || 'error'}: ${e.payload.message || ''}`],
  ]));
  if (!rows.length) rows.push(emptyRow('No errors.'));
  $(dev.card, '[data-error-log]').replaceChildren(...rows);
}

// --- timeline ----------------------------------------------------------------------

function showTimeline(dev) {
  const h = dev.history;
  const bar = $(dev.card, '[data-timeline]');
  const t0 = Date.parse(h.from), t1 = Date.parse(h.to);
  const pct = (t) => Math.max(0, Math.min(100, (t - t0) / (t1 - t0) * 100));
  const span = (attr, from, to, title, minPct) => {
    const el = document.createElement('span');
    el.setAttribute(attr, '');
    const left = pct(Date.parse(from));
    el.style.left = `${left}%`;
    if (to !== undefined) el.style.width = `${Math.max(minPct, pct(to == null ? t1 : Date.parse(to)) - left)}%`;
    el.title = title;
    return el;
  };
  const parts = [];
  for (const o of h.outages) parts.push(span('data-outage', o.from, o.to, `offline ${stamp(o.from)} – ${o.to ? stamp(o.to) : 'now'}`, 0.4));
  for (const r of h.replays) {
    parts.push(span('data-replay', r.from, r.to, `${r.count} message(s) from ${stamp(r.from)} – ${stamp(r.to)} arrived up to ${ms(r.max_late_ms)} late`, 0.6));
  }
  for (const r of h.reconnects) parts.push(span('data-reconnect', r.at, undefined, `reconnected ${r.connects}× before ${stamp(r.at)}`, 0));
  bar.replaceChildren(...parts);
  bar.dataset.range = h.range;
  bar.dataset.empty = String(h.online_at_start == null && !h.status.length && !h.lateness.messages);
  bar.dataset.loaded = 'true';
  $(dev.card, '[data-timeline-from]').textContent = stamp(h.from);
  $(dev.card, '[data-timeline-to]').textContent = 'now';
  const l = h.lateness;
  const p = $(dev.card, '[data-lateness]');
  p.dataset.p50Ms = l.p50_ms;
  p.dataset.maxMs = l.max_ms;
  p.dataset.replayed = l.replayed;
  p.textContent = l.messages
    ? `lateness p50 ${ms(l.p50_ms)} · max ${ms(l.max_ms)} · ${l.replayed} of ${l.messages} replayed · ${h.outages.length} outage(s), ${h.reconnects.length} reconnect(s)`
    : 'lateness: no messages in this range';
}

// --- charts ----------------------------------------------------------------------

const CHARTS = {
  temp: { pick: (h) => h.heartbeat.temp, unit: '°C' },
  cpu: { pick: (h) => h.heartbeat.cpu, unit: '%', min: 0, max: 100 },
  mem: { pick: (h) => h.heartbeat.mem, unit: '%', min: 0, max: 100 },
};

function drawCharts(dev) {
  if (!dev.history) return;
  for (const canvas of dev.card.querySelectorAll('canvas[data-chart]')) {
    const chart = CHARTS[canvas.dataset.chart];
    drawChart(canvas, chart.pick(dev.history), dev.history, chart);
  }
}

// Draws buckets ({t, min, avg, max}) over the history's range: the avg as a
// line, min..max as a band; a gap where a bucket is missing.
function drawChart(canvas, buckets, h, chart) {
  canvas.dataset.buckets = String(buckets.length);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, ht = canvas.clientHeight;
  if (!w || !ht) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(ht * dpr);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, ht);
  ctx.font = '10px system-ui, sans-serif';
  ctx.fillStyle = color('--muted');
  if (!buckets.length) {
    ctx.fillText('no data in this range', 4, ht / 2);
    return;
  }
  let lo = chart.min ?? Math.floor(Math.min(...buckets.map((b) => b.min)) - 1);
  let hi = chart.max ?? Math.ceil(Math.max(...buckets.map((b) => b.max)) + 1);
  if (hi <= lo) hi = lo + 1;
  const t0 = Date.parse(h.from), t1 = Date.parse(h.to), step = h.bucket_s * 1000;
  const left = 30, right = 4, top = 12, bottom = 14;
  const x = (t) => left + (t - t0) / (t1 - t0) * (w - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (ht - top - bottom);

  ctx.strokeStyle = color('--line');
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, y(hi)); ctx.lineTo(w - right, y(hi));
  ctx.moveTo(left, y(lo)); ctx.lineTo(w - right, y(lo));
  ctx.stroke();
  ctx.textAlign = 'right';
  ctx.fillText(String(hi), left - 3, y(hi) + 3);
  ctx.fillText(String(lo), left - 3, y(lo) + 3);
  ctx.fillText(`${buckets[buckets.length - 1].avg.toFixed(1)} ${chart.unit || ''}`, w - right, 9);
  ctx.textAlign = 'left';
  ctx.fillText(stamp(h.from), left, ht - 2);
  ctx.textAlign = 'right';
  ctx.fillText('now', w - right, ht - 2);

  const accent = color('--accent');
  ctx.fillStyle = accent;
  ctx.globalAlpha = 0.2;
  for (const b of buckets) {
    const t = Date.parse(b.t);
    ctx.fillRect(x(t), y(b.max), Math.max(1, x(t + step) - x(t)), Math.max(1, y(b.min) - y(b.max)));
  }
  ctx.globalAlpha = 1;
  ctx.strokeStyle = accent;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let prev = null;
  for (const b of buckets) {
    const t = Date.parse(b.t) + step / 2;
    if (prev != null && t - prev <= step * 1.5) ctx.lineTo(x(t), y(b.avg)); else ctx.moveTo(x(t), y(b.avg));
    prev = t;
  }
  ctx.stroke();
  if (buckets.length === 1) ctx.fillRect(x(Date.parse(buckets[0].t) + step / 2) - 2, y(buckets[0].avg) - 2, 4, 4);
}

function drawSensors(dev) {
  const box = $(dev.card, '[data-sensors]');
  const series = (dev.history && dev.history.sensors) || {};
  const names = [...new Set(Object.keys(series).concat(Object.keys(dev.sensors)))].sort();
  box.hidden = !names.length;
  $(dev.card, '[data-sensors-label]').hidden = !names.length;
  for (const name of names) {
    let fig = [...box.querySelectorAll('figure[data-sensor]')].find((f) => f.dataset.sensor === name);
    if (!fig) {
      fig = document.getElementById('sensor-chart').content.firstElementChild.cloneNode(true);
      fig.dataset.sensor = name;
      $(fig, '.sensor-name').textContent = name;
      box.append(fig);
    }
    const newest = dev.sensors[name];
    const unit = (newest && newest.unit) || (series[name] && series[name].unit) || '';
    if (newest) $(fig, '[data-sensor-value]').textContent = `${newest.value} ${unit}`.trim();
    if (dev.history) drawChart($(fig, 'canvas[data-sensor-chart]'), (series[name] && series[name].buckets) || [], dev.history, { unit });
  }
}

// --- fleet table -------------------------------------------------------------------

const FLEET_KEYS = {
  name: (d) => d.id,
  online: (d) => (d.online ? 1 : 0),
  last_seen: (d) => (d.lastSeen ? Date.parse(d.lastSeen) : 0),
  outbox: (d) => (d.outbox == null ? -1 : d.outbox),
};

function fleetMode() {
  return devices.size >= FLEET_MIN;
}

function showFleet() {
  const on = fleetMode();
  document.body.dataset.fleet = String(on);
  document.getElementById('fleet').hidden = !on;
  if (!on) return;
  const key = FLEET_KEYS[fleet.sort];
  const list = [...devices.values()].sort((a, b) => {
    const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * fleet.dir || (a.id < b.id ? -1 : 1);
  });
  const q = fleet.query.trim().toLowerCase();
  const rows = list.map((d) => {
    const tr = document.createElement('tr');
    tr.dataset.fleetDevice = d.id;
    tr.hidden = q !== '' && !d.id.toLowerCase().includes(q);
    tr.setAttribute('aria-selected', String(fleet.open === d.id));
    const cells = [d.id, d.online ? 'online' : 'offline', d.lastSeen ? ago(d.lastSeen).replace(/^.*\((.*)\)$/, '$1') : 'never', d.outbox ?? '–'];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = String(text);
      tr.append(td);
    }
    tr.children[1].dataset.online = String(d.online);
    tr.addEventListener('click', () => openCard(d.id));
    return tr;
  });
  document.querySelector('#fleet-table tbody').replaceChildren(...rows);
  for (const th of document.querySelectorAll('#fleet-table th[data-sort]')) {
    if (th.dataset.sort === fleet.sort) th.setAttribute('aria-sort', fleet.dir > 0 ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  }
}

function openCard(id) {
  fleet.open = fleet.open === id ? null : id;
  for (const dev of devices.values()) dev.card.dataset.open = String(dev.id === fleet.open);
  showFleet();
  const dev = devices.get(fleet.open);
  if (dev) {
    loadHistory(dev).catch((e) => console.warn(`fieldlink: history of ${dev.id}:`, e.message));
    dev.card.scrollIntoView({ block: 'start' });
  }
}

let fleetTimer = null;
function fleetLater() {
  if (fleetTimer || !fleetMode()) return;
  fleetTimer = setTimeout(() => { fleetTimer = null; showFleet(); }, 1000);
}

// --- loading and live updates ------------------------------------------------------

// Whether a card is on screen (every card, or the opened one in fleet mode).
const shown = (dev) => !fleetMode() || fleet.open === dev.id;

async function loadHistory(dev) {
  if (!shown(dev)) return;
  const base = `/api/devices/${enc(dev.id)}`;
  const [history, buttons, commands, errors] = await Promise.all([
    getJson(`${base}/history?range=${enc(range)}`),
    getJson(`${base}/events?kind=button&limit=${BUTTON_EVENTS}`),
    getJson(`${base}/commands?limit=${COMMANDS}`),
    getJson(`${base}/events?kind=error&limit=${ERRORS}`),
  ]);
  dev.history = history;
  // Merged with what the stream brought in the meantime.
  dev.buttons = mergeByIdentity(buttons.map(buttonOf), dev.buttons).slice(-BUTTON_EVENTS);
  // Each part on its own: one that cannot be drawn never hides the others.
  for (const [what, draw] of [
    ['timeline', () => showTimeline(dev)], ['charts', () => drawCharts(dev)], ['sensors', () => drawSensors(dev)],
    ['buttons', () => showButtons(dev)], ['commands', () => showCommands(dev, commands)], ['errors', () => showErrors(dev, errors)],
  ]) {
    try { draw(); } catch (e) { console.warn(`fieldlink: ${dev.id} ${what}:`, e.message); }
  }
}

// A live change: re-read the card's history soon (at most every REFRESH_MS).
function refreshLater(dev) {
  if (dev.refresh || !shown(dev)) return;
  dev.refresh = setTimeout(() => {
    dev.refresh = null;
    loadHistory(dev).catch((e) => console.warn(`fieldlink: history of ${dev.id}:`, e.message));
  }, REFRESH_MS);
}

let loading = null;
let loadAgain = false;

// Re-reads everything; calls made while a load runs fold into one more.
async function loadAll() {
  if (loading) { loadAgain = true; return loading; }
  loading = (async () => {
    do {
      loadAgain = false;
      try {
        const views = await getJson('/api/devices');
        // Each card on its own: one that cannot be drawn never hides the others.
        for (const view of views) {
          try { showView(view); } catch (e) { console.warn(`fieldlink: card ${view.device}:`, e.message); }
        }
        showFleet();
        await Promise.all(views.map((v) => loadHistory(device(v.device)).catch((e) => {
          console.warn(`fieldlink: history of ${v.device}:`, e.message);
        })));
      } catch (e) {
        console.warn('fieldlink: loading failed:', e.message);
      }
    } while (loadAgain);
    loading = null;
  })();
  return loading;
}

function onMessage(m) {
  if (!devices.has(m.device)) { loadAll(); return; } // a new device: read it whole
  const dev = device(m.device);
  setLastSeen(dev, new Date().toISOString());
  fleetLater();
  if (m.kind === 'heartbeat') {
    showHeartbeat(dev, m.payload);
    refreshLater(dev);
  } else if (m.kind === 'sensor') {
    const name = m.name || m.payload.sensor;
    const old = dev.sensors[name];
    if (!old || Date.parse(old.ts) <= Date.parse(m.ts)) dev.sensors[name] = { value: m.payload.value, unit: m.payload.unit, ts: m.ts };
    try { drawSensors(dev); } catch (e) { console.warn(`fieldlink: ${dev.id} sensors:`, e.message); }
    refreshLater(dev);
  } else if (m.kind === 'button') {
    dev.buttons = mergeByIdentity(dev.buttons, [buttonOf(m)]).slice(-BUTTON_EVENTS);
    showButtons(dev);
  } else if (m.kind === 'relay') {
    const name = m.name || m.payload.relay;
    setRelayState(dev, name, m.payload.state);
    const row = pending.get(m.payload.command_id);
    if (row) settle(row, { command_id: m.payload.command_id, status: 'confirmed', state: m.payload.state });
    if (m.payload.command_id) refreshLater(dev);
  } else if (m.kind === 'error') {
    const row = pending.get(m.payload.command_id);
    if (row) settle(row, { command_id: m.payload.command_id, status: 'rejected', error: `${m.payload.code}: ${m.payload.message}` });
    refreshLater(dev);
  }
}

function onLive(event) {
  let m;
  try { m = JSON.parse(event.data); } catch (_) { return; }
  if (m.type === 'message') onMessage(m);
  else if (m.type === 'status') {
    if (!devices.has(m.device)) { loadAll(); return; }
    const dev = device(m.device);
    setOnline(dev, m.online);
    setLastSeen(dev, m.at);
    fleetLater();
    refreshLater(dev);
  } else if (m.type === 'command') {
    const row = pending.get(m.command_id);
    if (row) settle(row, m);
    if (devices.has(m.device)) refreshLater(devices.get(m.device));
  } else if (m.type === 'reload') {
    loadAll(); // the stream fell behind: re-read rather than show a gap
  }
}

function setStream(state, text) {
  document.body.dataset.stream = state;
  document.getElementById('stream-status').textContent = text;
}

function connect() {
  let wasOpen = false;
  const es = new EventSource('/api/stream');
  es.onmessage = onLive;
  es.onopen = () => {
    setStream('open', 'live');
    if (wasOpen) loadAll(); // reconnected: fill the gap
    wasOpen = true;
  };
  es.onerror = () => {
    setStream('closed', 'reconnecting…');
    // The browser retries by itself unless the answer was not a stream at
    // all (a 401, say): then check the token and start over.
    if (es.readyState === EventSource.CLOSED) {
      setTimeout(() => loadAll().then(connect), 5000);
    }
  };
}

function setRange(r) {
  range = r;
  localStorage.setItem('fieldlink.range', r);
  document.body.dataset.range = r;
  for (const b of document.querySelectorAll('#range button[data-range]')) b.setAttribute('aria-pressed', String(b.dataset.range === r));
  for (const dev of devices.values()) {
    $(dev.card, '[data-timeline]').dataset.loaded = 'false';
    loadHistory(dev).catch((e) => console.warn(`fieldlink: history of ${dev.id}:`, e.message));
  }
}

// --- start ------------------------------------------------------------------------

let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => devices.forEach((dev) => {
    try { drawCharts(dev); drawSensors(dev); } catch (e) { console.warn(`fieldlink: ${dev.id} charts:`, e.message); }
  }), 150);
});
setInterval(() => { devices.forEach((dev) => setLastSeen(dev, null)); fleetLater(); }, 5000);

for (const b of document.querySelectorAll('#range button[data-range]')) b.addEventListener('click', () => setRange(b.dataset.range));
for (const th of document.querySelectorAll('#fleet-table th[data-sort]')) {
  th.addEventListener('click', () => {
    fleet.dir = fleet.sort === th.dataset.sort ? -fleet.dir : 1;
    fleet.sort = th.dataset.sort;
    showFleet();
  });
}
document.getElementById('fleet-search').addEventListener('input', (ev) => { fleet.query = ev.target.value; showFleet(); });

// Logging out ends the session on the hub (POST, so no other page can do
// it with a link or an image), then shows the login page.
document.getElementById('logout').addEventListener('click', async (ev) => {
  ev.preventDefault();
  try {
    await fetch('/logout', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}', credentials: 'same-origin' });
  } finally {
    location.href = '/login';
  }
});

setRange(range);
connect();
loadAll();

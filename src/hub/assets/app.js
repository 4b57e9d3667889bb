// fieldlink hub dashboard. Reads the devices and their history from the
// REST API, then stays live over server-sent events (/api/stream). No
// framework and no build step; the element hooks are listed in index.html.
// Everything from the network is written with textContent, never as HTML.
'use strict';

const HEARTBEATS = 720;   // points per chart: 6 h at a 30 s interval
const BUTTON_EVENTS = 50; // rows per button log
const SENSOR_EVENTS = 1000; // readings loaded per device (all its sensors together)
const SENSOR_POINTS = 500;  // points per sensor chart
const POLL_MS = 2000;     // re-reading a pending command
const POLL_TRIES = 90;    // ... for at most 3 minutes

const devices = new Map(); // device id -> Device (below)
const pending = new Map(); // command id -> relay row element

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

// A message's identity is (epoch, seq): seqs restart under a greater epoch
// when a device lost its seq counter. Epochs are unix ms, exact in a number.
const sameMessage = (x, y) => x.epoch === y.epoch && x.seq === y.seq;

// Merges two lists of {epoch, seq} into one, oldest first, each message once.
function mergeByIdentity(a, b) {
  const byId = new Map();
  for (const x of a.concat(b)) byId.set(`${x.epoch}:${x.seq}`, x);
  return [...byId.values()].sort((x, y) => (x.epoch - y.epoch) || (x.seq - y.seq));
}

// --- devices ---------------------------------------------------------------

// Device: { id, card, lastSeen, points: [{epoch, seq, t, hb}], buttons: [{epoch, seq, ts, name, state}],
//          sensors: Map(name -> [{epoch, seq, t, hb: payload}]) }
function device(id) {
  let dev = devices.get(id);
  if (dev) return dev;
  const card = document.getElementById('device-card').content.firstElementChild.cloneNode(true);
  card.dataset.device = id;
  $(card, '.name').textContent = id;
  dev = { id, card, lastSeen: null, points: [], buttons: [], sensors: new Map() };
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

// --- button log ----------------------------------------------------------------

function showButtons(dev) {
  const log = $(dev.card, '[data-button-log]');
  const rows = dev.buttons.slice(-BUTTON_EVENTS).reverse().map((b) => {
    const li = document.createElement('li');
    li.dataset.seq = b.seq;
    li.dataset.button = b.name;
    li.dataset.state = b.state;
    const time = document.createElement('time');
    time.dateTime = b.ts;
    time.textContent = clock(b.ts);
    const what = document.createElement('span');
    what.className = 'what';
    what.textContent = `${b.name} ${b.state}`;
    li.append(time, what);
    return li;
  });
  if (!rows.length) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = 'No button events yet.';
    rows.push(li);
  }
  log.replaceChildren(...rows);
}

const buttonOf = (e) => ({
  epoch: e.epoch ?? 0, seq: e.seq, ts: e.ts, name: e.name || e.payload.button, state: e.payload.state,
});
const pointOf = (e) => ({ epoch: e.epoch ?? 0, seq: e.seq, t: Date.parse(e.ts), hb: e.payload });

// --- charts ----------------------------------------------------------------------

const CHARTS = {
  temp: { pick: (hb) => hb.temp_c, unit: '°C' },
  cpu: { pick: (hb) => hb.cpu_percent, unit: '%', min: 0, max: 100 },
  mem: { pick: (hb) => (hb.mem_total_bytes ? 100 * hb.mem_used_bytes / hb.mem_total_bytes : null), unit: '%', min: 0, max: 100 },
};

function drawCharts(dev) {
  for (const canvas of dev.card.querySelectorAll('canvas[data-chart]')) {
    drawChart(canvas, dev.points, CHARTS[canvas.dataset.chart]);
  }
}

function drawChart(canvas, points, chart) {
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = '10px system-ui, sans-serif';
  ctx.fillStyle = color('--muted');

  const data = points.map((p) => ({ t: p.t, v: chart.pick(p.hb) })).filter((p) => Number.isFinite(p.t));
  const values = data.map((p) => p.v).filter((v) => v != null && Number.isFinite(v));
  if (!values.length) {
    // Heartbeats that arrived but carry no value: the board has no sensor
    // for this (temp_c is null on boards without one).
    ctx.fillText(data.length ? 'no sensor' : 'no data yet', 4, h / 2);
    return;
  }
  let lo = chart.min ?? Math.floor(Math.min(...values) - 1);
  let hi = chart.max ?? Math.ceil(Math.max(...values) + 1);
  if (hi <= lo) hi = lo + 1;
  const t0 = data[0].t, t1 = Math.max(data[data.length - 1].t, t0 + 1);
  const left = 30, right = 4, top = 12, bottom = 14;
  const x = (t) => left + (t - t0) / (t1 - t0) * (w - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom);

  // Axes: the range on the left, the time span below, the latest value on top.
  ctx.strokeStyle = color('--line');
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, y(hi)); ctx.lineTo(w - right, y(hi));
  ctx.moveTo(left, y(lo)); ctx.lineTo(w - right, y(lo));
  ctx.stroke();
  ctx.textAlign = 'right';
  ctx.fillText(String(hi), left - 3, y(hi) + 3);
  ctx.fillText(String(lo), left - 3, y(lo) + 3);
  ctx.fillText(`${values[values.length - 1].toFixed(1)} ${chart.unit}`, w - right, 9);
  const hhmm = (t) => new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  ctx.textAlign = 'left';
  ctx.fillText(hhmm(t0), left, h - 2);
  ctx.textAlign = 'right';
  ctx.fillText(hhmm(t1), w - right, h - 2);

  // The line, with a gap wherever a value is missing; a lone value is a dot.
  ctx.strokeStyle = ctx.fillStyle = color('--accent');
  ctx.lineWidth = 1.5;
  const ok = (p) => p && p.v != null && Number.isFinite(p.v);
  ctx.beginPath();
  data.forEach((p, i) => {
    if (!ok(p)) return;
    if (ok(data[i - 1])) ctx.lineTo(x(p.t), y(p.v)); else ctx.moveTo(x(p.t), y(p.v));
    if (!ok(data[i - 1]) && !ok(data[i + 1])) ctx.fillRect(x(p.t) - 2, y(p.v) - 2, 4, 4);
  });
  ctx.stroke();
}

// --- loading and live updates ------------------------------------------------------

async function loadHistory(dev) {
  const base = `/api/devices/${enc(dev.id)}/events`;
  const [heartbeats, buttons, readings] = await Promise.all([
    getJson(`${base}?kind=heartbeat&limit=${HEARTBEATS}`),
    getJson(`${base}?kind=button&limit=${BUTTON_EVENTS}`),
    getJson(`${base}?kind=sensor&limit=${SENSOR_EVENTS}`),
  ]);
  addReadings(dev, readings);
  drawSensors(dev);
  // Merged with what the stream brought in the meantime.
  dev.points = mergeByIdentity(heartbeats.map(pointOf), dev.points).slice(-HEARTBEATS);
  dev.buttons = mergeByIdentity(buttons.map(buttonOf), dev.buttons).slice(-BUTTON_EVENTS);
  drawCharts(dev);
  showButtons(dev);
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
  if (m.kind === 'heartbeat') {
    const point = pointOf(m);
    dev.points = mergeByIdentity(dev.points, [point]).slice(-HEARTBEATS);
    if (sameMessage(dev.points[dev.points.length - 1], point)) showHeartbeat(dev, m.payload);
    drawCharts(dev);
  } else if (m.kind === 'sensor') {
    addReadings(dev, [m]);
    drawSensors(dev);
  } else if (m.kind === 'button') {
    dev.buttons = mergeByIdentity(dev.buttons, [buttonOf(m)]).slice(-BUTTON_EVENTS);
    showButtons(dev);
  } else if (m.kind === 'relay') {
    const name = m.name || m.payload.relay;
    setRelayState(dev, name, m.payload.state);
    const row = pending.get(m.payload.command_id);
    if (row) settle(row, { command_id: m.payload.command_id, status: 'confirmed', state: m.payload.state });
  } else if (m.kind === 'error') {
    const row = pending.get(m.payload.command_id);
    if (row) settle(row, { command_id: m.payload.command_id, status: 'rejected', error: `${m.payload.code}: ${m.payload.message}` });
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
  } else if (m.type === 'command') {
    const row = pending.get(m.command_id);
    if (row) settle(row, m);
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

// --- start ------------------------------------------------------------------------

let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => devices.forEach((dev) => { drawCharts(dev); drawSensors(dev); }), 150);
});
setInterval(() => devices.forEach((dev) => setLastSeen(dev, null)), 5000);

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

connect();
loadAll();

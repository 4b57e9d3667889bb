// Owns the real-browser walk through the hub dashboard (issue 3): Debian's
// headless Chromium, driven by playwright-core, signs in with the token,
// sees the device online, lets a page it serves on another port of
// 127.0.0.1 try to switch the relay with the session cookie (a text/plain
// form and a no-cors fetch; both must be 403 and the relay stay off,
// issue 7), switches its relay `pump` on, waits until the page shows the
// command confirmed by the agent, saves full-page screenshots at a phone
// and a desktop width, and logs out (the old cookie must then be refused).
// Run by tests/hub_browser.rs;
// by hand:
//
//   node tests/browser/dashboard.mjs --url http://127.0.0.1:8080 \
//     --token <token> --device <device id> --screenshot target/test-artifacts/dashboard.png
//
// Arguments (each may be given by environment variable instead):
//   --url        FIELDLINK_DASHBOARD_URL   the hub's web root (http://127.0.0.1:<port>)
//   --token      FIELDLINK_TOKEN           the hub's token (from its token_file)
//   --device     FIELDLINK_DEVICE          the device id whose card is used
//   --relay      FIELDLINK_RELAY           the relay to switch on (default "pump")
//   --screenshot FIELDLINK_SCREENSHOT      screenshot base path: writes <base>-desktop.png
//                                          and <base>-phone.png (".png" on the base is dropped)
//   --chromium   FIELDLINK_CHROMIUM        the browser (default /usr/bin/chromium)
//   --fleet      FIELDLINK_FLEET           how many devices the hub has; more than 6 means the
//                                          fleet table is checked (search, sort) and the
//                                          device's card is opened from it (default 0: no table)
//
// Issue 9 item 7: the card's link timeline and lateness, the range switch
// (1h / 24h / 7d, each drawn from at most 300 server-side buckets), the
// command history (who asked) and the error log (a command for a relay the
// agent does not have is refused and shows in both) are checked, and the
// phone screenshot (375×812) must not scroll sideways.
//
// Exit 0: every step passed and both screenshots were written (their paths
// are printed as `screenshot: <path>`). Exit 1: a step failed; what the page
// showed (URL, text, console messages, page errors, failed requests) is
// printed, and <base>-failure.png is saved when the page could still be
// captured. Exit 2: bad arguments.
//
// Every wait is for something the page shows, with a 30 s limit per step;
// nothing sleeps a fixed time to decide whether something worked.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const STEP_MS = 30_000;
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 812 };

// The launch flags this machine's notes prescribe (rust-svc): without the
// background-networking ones Chromium keeps dialing Google's hosts, which
// the closed network refuses. The fresh --user-data-dir is passed as
// launchPersistentContext's first argument (playwright-core refuses it in
// `args`).
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function usage(problem) {
  console.error(`dashboard.mjs: ${problem}`);
  console.error('usage: node dashboard.mjs --url URL --token TOKEN --device ID --screenshot BASE[.png] [--relay NAME] [--chromium PATH]');
  process.exit(2);
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        url: { type: 'string' },
        token: { type: 'string' },
        device: { type: 'string' },
        relay: { type: 'string' },
        screenshot: { type: 'string' },
        chromium: { type: 'string' },
        fleet: { type: 'string' },
      },
    }).values;
  } catch (e) {
    usage(e.message);
  }
  const env = process.env;
  const o = {
    url: parsed.url ?? env.FIELDLINK_DASHBOARD_URL,
    token: parsed.token ?? env.FIELDLINK_TOKEN,
    device: parsed.device ?? env.FIELDLINK_DEVICE,
    relay: parsed.relay ?? env.FIELDLINK_RELAY ?? 'pump',
    screenshot: parsed.screenshot ?? env.FIELDLINK_SCREENSHOT,
    chromium: parsed.chromium ?? env.FIELDLINK_CHROMIUM ?? '/usr/bin/chromium',
    fleet: Number(parsed.fleet ?? env.FIELDLINK_FLEET ?? 0),
  };
  for (const key of ['url', 'token', 'device', 'screenshot']) {
    if (!o[key]) usage(`--${key} is missing`);
  }
  o.url = o.url.replace(/\/+$/, '');
  o.base = o.screenshot.replace(/\.png$/i, '');
  return o;
}

// CSS attribute selector value: the device id is [A-Za-z0-9_-], but quote
// it properly anyway.
const q = (s) => JSON.stringify(String(s));

// What the page did, for the failure report.
const seen = { console: [], pageErrors: [], failedRequests: [], steps: [] };

function watch(page) {
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') seen.console.push(`${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => seen.pageErrors.push(String(e && e.stack ? e.stack : e)));
  page.on('requestfailed', (r) => {
    const why = r.failure()?.errorText ?? 'failed';
    // The live stream is cut when the browser closes or navigates; that is no fault.
    if (!(r.url().endsWith('/api/stream') && why === 'net::ERR_ABORTED')) {
      seen.failedRequests.push(`${r.method()} ${r.url()}: ${why}`);
    }
  });
  page.on('response', (r) => {
    if (r.status() >= 500) seen.failedRequests.push(`${r.request().method()} ${r.url()}: HTTP ${r.status()}`);
  });
}

// The attacker (issue 7): a page on another port of 127.0.0.1, so the same
// *site* as the hub (its SameSite=Strict cookie goes along) but another
// origin. Loaded in the signed-in browser, it at once POSTs `body` to the
// relay endpoint twice: a `text/plain` form into a hidden frame and a
// `no-cors` fetch with credentials. Both must be refused. It also GETs
// `probeUrl` the same way as the fetch, to show that such a fetch does
// carry the cookie (playwright does not always see a no-cors request's
// cookie header). Returns the server (listening) and the attack page's URL.
async function attacker(relayUrl, probeUrl, body) {
  const eq = body.indexOf('=');
  // A text/plain form sends `name=value`: split the JSON at an '=' inside a
  // string so the body the hub receives is exactly `body`.
  const html = `<!doctype html><title>not the hub</title>
<form id="f" method="POST" enctype="text/plain" target="sink" action=${JSON.stringify(relayUrl)}>
<input type="hidden" name=${JSON.stringify(body.slice(0, eq))} value=${JSON.stringify(body.slice(eq + 1))}>
</form>
<iframe name="sink"></iframe>
<script>
Promise.allSettled([
  fetch(${JSON.stringify(relayUrl)}, { method: 'POST', mode: 'no-cors', credentials: 'include',
    headers: { 'Content-Type': 'text/plain' }, body: ${JSON.stringify(body)} }),
  fetch(${JSON.stringify(probeUrl)}, { mode: 'no-cors', credentials: 'include' }),
]).finally(() => { document.body.dataset.fetched = 'yes'; });
document.getElementById('f').submit();
</script>`;
  const server = createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end(html);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return { server, url: `http://127.0.0.1:${server.address().port}/` };
}

// GET `path` from the hub outside the browser; `auth` is the headers to
// present. Returns { status, body } (body parsed as JSON when it is).
async function hubGet(o, path, auth) {
  const r = await fetch(`${o.url}${path}`, { headers: auth, redirect: 'manual' });
  const text = await r.text();
  let body = text;
  try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
  return { status: r.status, body };
}

// Runs one named step; a failure says which step and what it waited for.
async function step(name, fn) {
  const started = Date.now();
  try {
    const result = await fn();
    seen.steps.push(`ok   ${name}`);
    console.log(`step ok: ${name} (${Date.now() - started} ms)`);
    return result;
  } catch (e) {
    seen.steps.push(`FAIL ${name}`);
    const err = new Error(`step failed: ${name}: ${e.message.split('\n')[0]}`);
    err.cause = e;
    throw err;
  }
}

// Waits until `sel` matches, within STEP_MS.
const visible = (page, sel) => page.locator(sel).first().waitFor({ state: 'visible', timeout: STEP_MS });

async function report(page, base) {
  console.error('---- what the browser saw ----');
  console.error('steps:\n  ' + seen.steps.join('\n  '));
  if (page && !page.isClosed()) {
    console.error(`url: ${page.url()}`);
    try {
      const state = await page.evaluate(() => ({
        title: document.title,
        stream: document.body && document.body.dataset.stream,
        text: document.body ? document.body.innerText : '(no body)',
      }));
      console.error(`title: ${state.title}; body[data-stream]: ${state.stream}`);
      console.error(`page text:\n${state.text.slice(0, 6000)}`);
    } catch (e) {
      console.error(`page text: (unreadable: ${e.message})`);
    }
    try {
      const relays = await page.evaluate(() =>
        [...document.querySelectorAll('[data-relay]')].map((r) => ({
          device: r.closest('[data-device]')?.dataset.device,
          relay: r.dataset.relay,
          state: r.dataset.state,
          command: r.querySelector('[data-command-status]')?.dataset.status ?? null,
          commandText: r.querySelector('[data-command-status]')?.textContent ?? null,
        })),
      );
      console.error(`relay rows: ${JSON.stringify(relays)}`);
    } catch (_) { /* the page text above has to do */ }
    try {
      const path = `${base}-failure.png`;
      await page.screenshot({ path, fullPage: true, timeout: STEP_MS });
      console.error(`failure screenshot: ${path}`);
    } catch (e) {
      console.error(`failure screenshot: not taken (${e.message.split('\n')[0]})`);
    }
  }
  console.error(`console errors and warnings (${seen.console.length}):\n  ${seen.console.join('\n  ') || '(none)'}`);
  console.error(`uncaught page errors (${seen.pageErrors.length}):\n  ${seen.pageErrors.join('\n  ') || '(none)'}`);
  console.error(`failed requests (${seen.failedRequests.length}):\n  ${seen.failedRequests.join('\n  ') || '(none)'}`);
}

// Waits until every chart canvas of the card has been drawn for its current
// size (app.js sets canvas.width from clientWidth on every draw, and redraws
// after a resize), so a screenshot never shows a stretched stale bitmap.
async function chartsFitted(page, card) {
  await page.waitForFunction(
    (sel) => {
      const canvases = [...document.querySelectorAll(`${sel} canvas[data-chart]`)];
      const dpr = window.devicePixelRatio || 1;
      return canvases.length > 0 &&
        canvases.every((c) => c.clientWidth === 0 || c.width === Math.round(c.clientWidth * dpr));
    },
    card,
    { timeout: STEP_MS },
  );
}

// The widest element that sticks out of the viewport, if any: a phone
// layout that scrolls sideways is reported (not failed).
async function overflow(page) {
  return page.evaluate(() => {
    const vw = document.documentElement.clientWidth;
    const doc = document.documentElement.scrollWidth;
    let worst = null;
    for (const el of document.querySelectorAll('body *')) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.right > vw + 1 && (!worst || r.right > worst.right)) {
        worst = { right: Math.round(r.right), tag: el.tagName.toLowerCase(), cls: el.className || '' };
      }
    }
    return { viewport: vw, scrollWidth: doc, worst };
  });
}

async function shoot(page, card, size, path, label) {
  await page.setViewportSize(size);
  await chartsFitted(page, card);
  mkdirSync(dirname(path), { recursive: true });
  await page.screenshot({ path, fullPage: true, timeout: STEP_MS });
  const o = await overflow(page);
  console.log(`screenshot: ${path}`);
  if (o.scrollWidth > o.viewport) {
    throw new Error(`${label} ${size.width}px: the page scrolls sideways (${o.scrollWidth}px wide); ` +
      `widest overflow: <${o.worst?.tag} class="${o.worst?.cls}"> to ${o.worst?.right}px`);
  }
}

// The fleet table's visible device names, top to bottom.
const fleetNames = (page) => page.$$eval('#fleet-table tbody tr:not([hidden])', (rows) => rows.map((r) => r.dataset.fleetDevice));

// The fleet table: every device listed, search narrows it to one, sorting by
// name and by online works, and clicking the device's row opens its card.
async function checkFleet(page, o, card) {
  await step(`the fleet table lists all ${o.fleet} devices`, async () => {
    await visible(page, '#fleet-table');
    await page.waitForFunction((n) => document.querySelectorAll('#fleet-table tbody tr').length === n, o.fleet, { timeout: STEP_MS });
    if (await page.locator(card).isVisible()) throw new Error('with a fleet, no card is open before one is chosen');
  });
  await step('searching by name leaves only that device', async () => {
    await page.locator('#fleet-search').fill(o.device);
    const names = await fleetNames(page);
    if (names.length !== 1 || names[0] !== o.device) throw new Error(`search "${o.device}" shows [${names}]`);
    await page.locator('#fleet-search').fill('');
    const all = await fleetNames(page);
    if (all.length !== o.fleet) throw new Error(`an empty search shows ${all.length} of ${o.fleet}`);
  });
  await step('sorting by name (twice: reversed) and by online', async () => {
    const byName = await fleetNames(page);
    const sorted = [...byName].sort();
    if (JSON.stringify(byName) !== JSON.stringify(sorted)) throw new Error(`not sorted by name at first: [${byName}]`);
    await page.locator('#fleet-table th[data-sort="name"]').click();
    const reversed = await fleetNames(page);
    if (JSON.stringify(reversed) !== JSON.stringify([...sorted].reverse())) throw new Error(`name descending: [${reversed}]`);
    await page.locator('#fleet-table th[data-sort="online"]').click();
    const online = await page.$$eval('#fleet-table tbody tr td:nth-child(2)', (tds) => tds.map((td) => td.dataset.online));
    const firstOnline = online.indexOf('true');
    if (firstOnline < 0 || online.slice(firstOnline).includes('false')) throw new Error(`online ascending: [${online}]`);
    const sort = await page.locator('#fleet-table th[data-sort="online"]').getAttribute('aria-sort');
    if (sort !== 'ascending') throw new Error(`aria-sort on online is ${sort}`);
  });
  await step(`clicking ${o.device}'s row opens its card`, async () => {
    await page.locator(`#fleet-table tr[data-fleet-device=${q(o.device)}]`).click();
    await visible(page, `${card}[data-open="true"]`);
  });
}

// The card's timeline, lateness and charts over each range.
async function checkRanges(page, card) {
  for (const r of ['24h', '7d', '1h']) {
    await step(`range ${r}: the timeline and charts are redrawn from at most 300 buckets`, async () => {
      await page.locator(`#range button[data-range="${r}"]`).click();
      await visible(page, `${card} [data-timeline][data-range="${r}"][data-loaded="true"]`);
      const buckets = await page.$$eval(`${card} canvas[data-chart]`, (cs) => cs.map((c) => Number(c.dataset.buckets)));
      if (!buckets.length || buckets.some((n) => !(n >= 0 && n <= 300))) throw new Error(`bucket counts ${buckets}`);
      if (!buckets.some((n) => n > 0)) throw new Error(`no chart has data over ${r}: ${buckets}`);
      const pressed = await page.locator(`#range button[data-range="${r}"]`).getAttribute('aria-pressed');
      if (pressed !== 'true') throw new Error(`the ${r} button is not shown pressed`);
    });
  }
}

async function main() {
  const o = options();
  const card = `[data-device=${q(o.device)}]`;
  const row = `${card} [data-relay=${q(o.relay)}]`;
  const profile = mkdtempSync(join(tmpdir(), 'fieldlink-chromium-'));
  let context = null;
  let page = null;
  let failed = false;
  try {
    context = await step(`launch ${o.chromium} (headless)`, () =>
      chromium.launchPersistentContext(profile, {
        executablePath: o.chromium,
        headless: true,
        args: FLAGS,
        viewport: DESKTOP,
        timeout: STEP_MS,
      }));
    context.setDefaultTimeout(STEP_MS);
    context.setDefaultNavigationTimeout(STEP_MS);
    page = context.pages()[0] ?? await context.newPage();
    watch(page);

    await step('open / and land on the login page', async () => {
      await page.goto(`${o.url}/`, { waitUntil: 'domcontentloaded' });
      await visible(page, 'form#login input[name=token]');
      const path = new URL(page.url()).pathname;
      if (path !== '/login') throw new Error(`expected to be sent to /login, the page is at ${path}`);
    });

    await step('type the token and sign in', async () => {
      const input = page.locator('form#login input[name=token]');
      await input.click();
      await input.pressSequentially(o.token);
      await page.locator('form#login button[type=submit]').click();
      // The dashboard (its logout link: #devices is empty, so invisible,
      // until a device has reported), or the login page's refusal.
      const refusal = page.locator('#login-error');
      await page.locator('a#logout').or(refusal).first().waitFor({ state: 'visible', timeout: STEP_MS });
      if (await refusal.isVisible()) throw new Error(`the hub refused the token: ${await refusal.textContent()}`);
      const path = new URL(page.url()).pathname;
      if (path !== '/') throw new Error(`expected the dashboard at /, the page is at ${path}`);
      await page.locator('#devices').waitFor({ state: 'attached', timeout: STEP_MS });
    });

    await step('the live stream opens (body[data-stream="open"])', () =>
      visible(page, 'body[data-stream="open"]'));

    if (o.fleet > 6) await checkFleet(page, o, card);

    await step(`device ${o.device} is shown online`, () => visible(page, `${card} [data-online="true"]`));

    await step(`relay ${o.relay} is shown with its On button`, () =>
      visible(page, `${row} button[data-action="on"]:not([disabled])`));

    await step('a page on another port POSTs a text/plain form and a no-cors fetch: both refused', async () => {
      const relayUrl = `${o.url}/api/devices/${encodeURIComponent(o.device)}/relays/${encodeURIComponent(o.relay)}?wait=0s`;
      const probeUrl = `${o.url}/api/devices`;
      const evil = await attacker(relayUrl, probeUrl, '{"state":"on","pad":"x=y"}');
      const attack = await context.newPage();
      try {
        // Every request the attack page makes to the hub's relay endpoint, with its answer.
        const hits = [];
        let probe;
        // (`response`, not `requestfinished`: Chromium reports the opaque
        // no-cors answer as a failed request once it is read.)
        attack.on('response', async (resp) => {
          const req = resp.request();
          if (req.method() === 'POST' && req.url() === relayUrl) {
            hits.push({ type: req.resourceType(), headers: await req.allHeaders(), status: resp.status() });
          } else if (req.method() === 'GET' && req.url() === probeUrl) {
            probe = resp.status();
          }
        });
        await attack.goto(evil.url, { waitUntil: 'load' });
        await attack.waitForFunction(() => document.body.dataset.fetched === 'yes', null, { timeout: STEP_MS });
        const deadline = Date.now() + STEP_MS;
        while ((hits.length < 2 || probe === undefined) && Date.now() < deadline) {
          await attack.waitForTimeout(50);
        }
        const cookie = (h) => /fieldlink_session=/.test(h.headers.cookie ?? '');
        console.log(`  attack requests: ${JSON.stringify(hits.map((h) => ({ type: h.type, status: h.status,
          cookie: cookie(h), site: h.headers['sec-fetch-site'] })))}; no-cors GET ${probeUrl}: ${probe}`);
        const types = hits.map((h) => h.type).sort().join(',');
        if (types !== 'document,fetch') throw new Error(`expected the form and the fetch to reach the hub, saw [${types}]`);
        // Without the cookie the attack would prove nothing.
        if (!cookie(hits.find((h) => h.type === 'document'))) throw new Error('the form POST carried no session cookie');
        if (probe !== 200) throw new Error(`a no-cors fetch from this page is not signed in (GET answered ${probe})`);
        for (const h of hits) {
          if (h.status !== 403) throw new Error(`the ${h.type} POST was answered ${h.status}, not 403`);
        }
      } finally {
        await attack.close();
        evil.server.close();
      }
      const { status, body } = await hubGet(o, '/api/devices', { Authorization: `Bearer ${o.token}` });
      const dev = Array.isArray(body) ? body.find((d) => d.device === o.device) : null;
      if (status !== 200 || !dev) throw new Error(`GET /api/devices: ${status} ${JSON.stringify(body)}`);
      if (dev.relays?.[o.relay] !== 'off') throw new Error(`relay ${o.relay} is "${dev.relays?.[o.relay]}" after the attack`);
      const shown = await page.locator(`${row}`).getAttribute('data-state');
      if (shown !== 'off') throw new Error(`the dashboard shows relay ${o.relay} "${shown}" after the attack`);
    });

    await step(`click ${o.relay}'s On button`, () => page.locator(`${row} button[data-action="on"]`).click());

    await step('the command is settled and shown confirmed', async () => {
      // Waits for any final status, so a rejection fails at once with its text.
      const status = page.locator(`${row} [data-command-status]`);
      await page.waitForFunction(
        (sel) => ['confirmed', 'rejected', 'expired', 'failed'].includes(document.querySelector(sel)?.dataset.status),
        `${row} [data-command-status]`,
        { timeout: STEP_MS },
      );
      const got = await status.getAttribute('data-status');
      if (got !== 'confirmed') throw new Error(`command status is "${got}": ${await status.textContent()}`);
    });

    await step(`relay ${o.relay} is shown on`, async () => {
      await visible(page, `${row}[data-state="on"]`);
      await page.waitForFunction(
        (sel) => document.querySelector(sel)?.textContent.trim() === 'on',
        `${row} [data-relay-state]`,
        { timeout: STEP_MS },
      );
    });

    await step('the button log and charts are loaded', async () => {
      // loadHistory() fills the log (a row, or "No button events yet.") after drawing the charts.
      await visible(page, `${card} [data-button-log] li`);
    });

    await step('the sensor "tank" is charted with its newest reading', async () => {
      const fig = `${card} [data-sensors] figure[data-sensor="tank"]`;
      await visible(page, `${fig} canvas[data-sensor-chart]`);
      await page.waitForFunction(
        (sel) => {
          const c = document.querySelector(`${sel} canvas`);
          const value = document.querySelector(`${sel} [data-sensor-value]`)?.textContent ?? '';
          // Drawn (the bitmap was sized from the layout) and labelled with a number and the unit.
          return c && c.width > 0 && c.clientWidth > 0 && /^-?\d+(\.\d+)? °C$/.test(value.trim());
        },
        fig,
        { timeout: STEP_MS },
      );
    });

    await step('a command for a relay the agent lacks is refused: error log and command history show it', async () => {
      const status = await page.evaluate(async (path) => {
        const r = await fetch(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"state":"on"}' });
        return r.status;
      }, `/api/devices/${encodeURIComponent(o.device)}/relays/nosuch?wait=30s`);
      if (status !== 409) throw new Error(`POST for relay nosuch answered ${status}, not 409`);
      await visible(page, `${card} [data-error-log] li[data-code="unknown_relay"]`);
      await visible(page, `${card} [data-command-log] li[data-status="rejected"]`);
      const by = await page.locator(`${card} [data-command-log] li[data-status="confirmed"] [data-by]`).first().textContent();
      if (!/dashboard session/.test(by)) throw new Error(`the confirmed command says "${by}", not who asked`);
    });

    await step('the link timeline and lateness are shown', async () => {
      await visible(page, `${card} [data-timeline][data-loaded="true"]`);
      await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.p50Ms !== undefined, `${card} [data-lateness]`, { timeout: STEP_MS });
    });

    await checkRanges(page, card);

    if (seen.pageErrors.length) {
      throw new Error(`the page threw ${seen.pageErrors.length} uncaught error(s)`);
    }

    await step('desktop screenshot', () => shoot(page, card, DESKTOP, `${o.base}-desktop.png`, 'desktop'));
    await step('phone screenshot', () => shoot(page, card, PHONE, `${o.base}-phone.png`, 'phone'));

    await step('log out: back on the login page, and the old session cookie is refused', async () => {
      const before = (await context.cookies(o.url)).find((c) => c.name === 'fieldlink_session');
      if (!before) throw new Error('no fieldlink_session cookie while signed in');
      await page.locator('a#logout').click();
      await visible(page, 'form#login input[name=token]');
      const path = new URL(page.url()).pathname;
      if (path !== '/login') throw new Error(`expected /login after logging out, the page is at ${path}`);
      const after = (await context.cookies(o.url)).find((c) => c.name === 'fieldlink_session');
      if (after && after.value) throw new Error('the browser still holds a session cookie');
      const stale = await hubGet(o, '/api/devices', { Cookie: `fieldlink_session=${before.value}` });
      if (stale.status !== 401) throw new Error(`the old session cookie still gets ${stale.status} from /api/devices`);
      await page.goto(`${o.url}/`, { waitUntil: 'domcontentloaded' });
      await visible(page, 'form#login input[name=token]');
    });

    if (seen.console.length) {
      console.log(`console errors and warnings (not failures):\n  ${seen.console.join('\n  ')}`);
    }
  } catch (e) {
    failed = true;
    console.error(e.message);
    if (e.cause && e.cause.message) console.error(`  ${e.cause.message.split('\n').slice(0, 8).join('\n  ')}`);
    await report(page, o.base);
  } finally {
    if (context) {
      await context.close().catch((e) => console.error(`closing the browser: ${e.message}`));
    }
    rmSync(profile, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(`dashboard.mjs: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});

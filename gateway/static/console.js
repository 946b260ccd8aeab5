// The onecard console: polls console/snapshot and draws it; actions go to the gateway's admin routes.
// Every URL is relative (same origin); the key travels only in an Authorization header and is kept in
// sessionStorage (this tab only). No data is ever written as HTML: text goes through textContent.
'use strict';
(() => {
  const POLL_MS = 500;       // live within a second of a change
  const RETRY_MS = 1000;     // while the gateway is away (a restart): keep trying, no reload needed
  const LOG_MS = 2000;
  const USAGE_MS = 5000;
  const KEY = 'onecard.key';
  const $ = (id) => document.getElementById(id);
  const engines = new Map();  // model -> {body, cells, buttons, details}
  const sig = {};             // section -> last rendered JSON, so unchanged sections are left alone
  let startedAt = null;
  let snap = null;
  let rendered = false;

  // --- small helpers -------------------------------------------------------------------------------
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('data-')) e.setAttribute(k, v);
      else if (k === 'on') e.addEventListener('click', v);
      else e[k] = v;
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }
  const key = () => sessionStorage.getItem(KEY) || '';
  const auth = () => (key() ? { Authorization: 'Bearer ' + key() } : {});
  const gib = (x) => (x === null || x === undefined ? '–' : Number(x).toFixed(2));
  const secs = (s) => {
    if (s === null || s === undefined) return '–';
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.round((s % 3600) / 60) + ' min';
  };
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  function changed(section, value) {
    const s = JSON.stringify(value);
    if (sig[section] === s) return false;
    sig[section] = s;
    return true;
  }
  let toastTimer = 0;
  function toast(text, isError) {
    const t = $('toast');
    t.textContent = text;
    t.className = 'toast' + (isError ? ' error' : '');
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, isError ? 8000 : 4000);
  }
  async function errorText(r) {
    try {
      const body = await r.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return r.statusText || 'no reason given';
  }
  const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

  // --- the key -----------------------------------------------------------------------------------
  function showMode() {
    const keys = snap ? snap.gateway.keys : null;
    let text;
    let title;
    if (key()) {
      text = 'key set (this tab only)';
      title = 'sent as Authorization: Bearer with every request of this tab; gone when the tab closes';
    } else if (keys === false) {
      text = 'no keys: admin from this machine';
      title = 'this gateway has no keys: its admin routes answer only on the machine it runs on';
    } else {
      text = 'read-only';
      title = 'enter the admin key to load, unload, sleep, wake or release a lease';
    }
    $('mode').textContent = text;
    $('mode').title = title;
    $('key-forget').disabled = !key();
  }
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('key').value.trim();
    if (v) sessionStorage.setItem(KEY, v);
    $('key').value = '';
    showMode();
    poll();
  });
  $('key-forget').addEventListener('click', () => { sessionStorage.removeItem(KEY); showMode(); });

  // --- actions -----------------------------------------------------------------------------------
  async function act(label, method, url, button) {
    if (button) button.disabled = true;
    try {
      const r = await fetch(url, { method, headers: auth(), cache: 'no-store' });
      if (r.ok) {
        const body = await r.json().catch(() => ({}));
        toast(label + ': done' + (body.state ? ' (' + body.state + ')' : ''), false);
      } else {
        toast(label + ': refused (' + r.status + '): ' + (await errorText(r)), true);
      }
    } catch (e) {
      toast(label + ': the gateway did not answer', true);
    } finally {
      if (button) button.disabled = false;
      poll();
    }
  }

  // --- the card ----------------------------------------------------------------------------------
  const KIND_LABEL = { resident: 'resident', sleeping: 'sleeping', lease: 'lease', headroom: 'headroom', free: 'free' };
  function renderCard(s) {
    const c = s.card;
    if (!changed('card', [c, s.gpus, s.thermal])) return;
    const m = c.measured;
    let sum = 'Budget ' + gib(c.budget_gib) + ' GiB (' + s.gateway.platform + '), headroom ' + gib(c.headroom_gib) +
      ' GiB · planned in use ' + gib(c.planned_used_gib) + ' GiB';
    if (c.over_budget_gib > 0) sum += ' · over the budget by ' + gib(c.over_budget_gib) + ' GiB';
    sum += m && m.used_gib !== null
      ? ' · measured (NVML) ' + gib(m.used_gib) + ' of ' + gib(m.total_gib) + ' GiB'
      : ' · no GPU seen by NVML: planned figures only';
    if (s.gpus.length) sum += ' · ' + s.gpus.map((g) => 'GPU ' + g.index + ': ' + g.name).join(', ');
    $('card-summary').textContent = sum;
    const bar = $('bar');
    const scale = Math.max(c.budget_gib, c.planned_used_gib + c.headroom_gib, (m && m.used_gib) || 0) || 1;
    bar.replaceChildren(...c.segments.filter((g) => g.gib > 0).map((g) => {
      const seg = el('div', { class: 'seg ' + g.kind, 'data-kind': g.kind, 'data-model': g.model,
        title: KIND_LABEL[g.kind] + (g.model ? ' ' + g.model : '') + ': ' + gib(g.gib) + ' GiB',
        text: (g.model || KIND_LABEL[g.kind]) + ' ' + gib(g.gib) });
      seg.style.width = (100 * g.gib / scale) + '%';
      return seg;
    }));
    if (m && m.used_gib !== null) {
      const mark = el('div', { class: 'marker', title: 'measured by NVML: ' + gib(m.used_gib) + ' GiB' });
      mark.style.left = Math.min(100, 100 * m.used_gib / scale) + '%';
      bar.append(mark);
    }
    const totals = {};
    for (const g of c.segments) totals[g.kind] = (totals[g.kind] || 0) + g.gib;
    const legend = Object.keys(KIND_LABEL).filter((k) => k in totals).map((k) =>
      el('li', null, el('span', { class: 'sw ' + k }), KIND_LABEL[k] + ' ' + gib(totals[k]) + ' GiB'));
    if (m && m.used_gib !== null) legend.push(el('li', null, el('span', { class: 'sw nvml' }), 'measured (NVML) ' + gib(m.used_gib) + ' GiB'));
    $('legend').replaceChildren(...legend);
    const tiles = [];
    const t = s.thermal;
    for (const g of s.gpus) {
      const pre = s.gpus.length > 1 ? 'GPU ' + g.index + ' ' : '';
      const hot = g.temperature_c !== null && g.temperature_c >= t.limit_c;
      tiles.push(tile(pre + 'Temperature', g.temperature_c === null ? '–' : g.temperature_c.toFixed(0) + ' °C',
        'cap ' + t.limit_c.toFixed(0) + ' °C', hot));
      tiles.push(tile(pre + 'Power', g.power_w === null ? '–' : g.power_w.toFixed(0) + ' W', ''));
      tiles.push(tile(pre + 'Memory', gib(g.memory_used_gib) + ' GiB', 'of ' + gib(g.memory_total_gib) + ' GiB'));
      tiles.push(tile(pre + 'SM clock', g.sm_clock_mhz === null ? '–' : g.sm_clock_mhz + ' MHz',
        g.utilization_ratio === null ? '' : Math.round(100 * g.utilization_ratio) + '% busy'));
      const reasons = (g.clock_event_reasons || []).filter((r) => r !== 'idle');
      tiles.push(tile(pre + 'Clock events', reasons.length ? reasons.join(', ') : 'none', '',
        reasons.some((r) => r.includes('thermal'))));
    }
    tiles.push(tile('Thermal cap', t.limit_c.toFixed(0) + ' °C',
      t.lowered ? 'admission lowered to ' + t.admission_limit : 'admission normal', t.lowered));
    $('gpus').replaceChildren(...tiles);
  }
  function tile(label, value, note, hot) {
    return el('div', { class: 'tile' + (hot ? ' hot' : '') }, el('span', { text: label }), el('b', { text: value }),
      note ? el('span', { text: note }) : null);
  }

  // --- engines -----------------------------------------------------------------------------------
  function engineRow(name) {
    const cells = {};
    const cell = (k, cls) => (cells[k] = el('td', { class: cls }));
    const buttons = {
      load: el('button', { type: 'button', text: 'Load', 'data-action': 'load' }),
      wake: el('button', { type: 'button', text: 'Wake', 'data-action': 'wake' }),
      sleep: el('button', { type: 'button', text: 'Sleep', 'data-action': 'sleep', title: 'sleep level 1' }),
      unload: el('button', { type: 'button', class: 'danger', text: 'Unload', 'data-action': 'unload' }),
    };
    const path = 'admin/engines/' + encodeURIComponent(name);
    buttons.load.addEventListener('click', () => act('load ' + name, 'POST', path + '/load', buttons.load));
    buttons.wake.addEventListener('click', () => act('wake ' + name, 'POST', path + '/wake', buttons.wake));
    buttons.sleep.addEventListener('click', () => act('sleep ' + name, 'POST', path + '/sleep?level=1', buttons.sleep));
    buttons.unload.addEventListener('click', () => act('unload ' + name, 'POST', path + '/unload', buttons.unload));
    const flags = el('pre', { class: 'flags' });
    const flagsNote = el('span', { class: 'muted small' });
    const log = el('pre', { class: 'log', text: 'open to read the log (admin key)' });
    const logDetails = el('details', { class: 'log-details' }, el('summary', { text: 'Log tail (admin)' }), log);
    const flagDetails = el('details', null, el('summary', null, 'vLLM flags ', flagsNote), flags);
    const error = el('div', { class: 'err small' });
    const main = el('tr', null, cell('model'), cell('state'), cell('uptime', 'num'), cell('flight', 'num'),
      cell('queued', 'num'), cell('gib', 'num'), cell('adapters'),
      el('td', { class: 'actions' }, buttons.load, buttons.wake, buttons.sleep, buttons.unload));
    const more = el('tr', { class: 'more' }, el('td', { colSpan: 8 }, error, flagDetails, logDetails));
    const body = el('tbody', { class: 'engine', 'data-model': name }, main, more);
    const row = { body, cells, buttons, flags, flagsNote, log, logDetails, error, lastLog: 0 };
    logDetails.addEventListener('toggle', () => { if (logDetails.open) readLog(name, row); });
    return row;
  }
  function renderEngines(s) {
    const table = $('engines');
    const seen = new Set();
    for (const e of s.engines) {
      seen.add(e.model);
      let row = engines.get(e.model);
      if (!row) {
        row = engineRow(e.model);
        engines.set(e.model, row);
        table.append(row.body);
      }
      const c = row.cells;
      row.body.dataset.state = e.state;
      if (changed('name:' + e.model, [e.aliases, e.pinned])) {
        c.model.replaceChildren(el('span', { class: 'name', text: e.model },
          e.pinned ? el('span', { class: 'kind', text: 'pinned' }) : null,
          e.aliases.length ? el('span', { class: 'aka', text: 'aka ' + e.aliases.join(', ') }) : null));
      }
      const stateText = e.state + (e.sleep_level ? ' (level ' + e.sleep_level + ')' : '') + (e.draining ? ', draining' : '');
      if (changed('state:' + e.model, stateText)) {
        c.state.replaceChildren(el('span', { class: 'pill', 'data-state': e.state, text: stateText }));
      }
      c.uptime.textContent = secs(e.uptime_s);
      c.flight.textContent = String(e.in_flight);
      c.queued.textContent = String(e.queued) + (e.oldest_wait_s !== null ? ', oldest ' + secs(e.oldest_wait_s) : '');
      c.gib.textContent = gib(e.planned_gib) + (e.measured_gib !== null ? ' / ' + gib(e.measured_gib) : '');
      c.gib.title = 'planned ' + gib(e.planned_gib) + ' GiB' +
        (e.measured_gib !== null ? ', measured ' + gib(e.measured_gib) + ' GiB' : ', not measured yet');
      c.adapters.textContent = e.adapters.length ? e.adapters.join(', ') : '–';
      const b = row.buttons;
      b.load.hidden = !(e.state === 'stopped' || e.state === 'failed');
      b.wake.hidden = e.state !== 'sleeping';
      b.sleep.hidden = e.state !== 'ready';
      b.unload.hidden = e.state === 'stopped';
      row.error.textContent = e.last_error || '';
      if (changed('flags:' + e.model, [e.engine_args, e.engine_args_source])) {
        row.flags.textContent = 'vllm serve ' + e.engine_args.join(' ');
        row.flagsNote.textContent = e.engine_args_source === 'running' ? '(running with)' : '(will start with)';
      }
      if (row.logDetails.open && Date.now() - row.lastLog > LOG_MS) readLog(e.model, row);
    }
    for (const [name, row] of engines) {
      if (seen.has(name)) continue;
      row.body.remove();
      engines.delete(name);
      for (const k of ['name:', 'state:', 'flags:']) delete sig[k + name];  // drawn afresh if it comes back
    }
    const sched = s.scheduler.last_reason ? 'scheduler: ' + s.scheduler.last_reason : '';
    $('sched').textContent = sched;
  }
  async function readLog(name, row) {
    row.lastLog = Date.now();
    try {
      const r = await fetch('admin/engines/' + encodeURIComponent(name) + '/log?lines=40',
        { headers: auth(), cache: 'no-store' });
      row.log.textContent = r.ok ? ((await r.text()) || '(empty)') : 'the log needs the admin key: ' + (await errorText(r));
    } catch (e) {
      row.log.textContent = 'the gateway did not answer';
    }
  }

  // --- swaps, leases, adapters, usage ------------------------------------------------------------
  function renderSwaps(s) {
    if (!changed('swaps', s.swaps)) return;
    const items = s.swaps.slice().reverse().map((w) => el('li', { 'data-model': w.model, 'data-kind': w.kind },
      el('div', null, el('span', { class: 'when', text: clock(w.at) }), ' ',
        el('b', { text: w.model }), el('span', { class: 'kind', text: w.kind.replace('_', '-') }),
        ' ', el('span', { class: 'muted', text: secs(w.seconds) })),
      el('div', { class: 'small', text: w.evicted.length ? 'evicted ' + w.evicted.join(', ') : 'evicted nothing' }),
      el('div', { class: 'why', text: w.reason })));
    $('timeline').replaceChildren(...(items.length ? items : [el('li', { class: 'empty', text: 'no swaps yet' })]));
  }
  function renderLeases(s) {
    if (!changed('leases', s.leases)) return;
    const box = $('leases');
    if (!s.leases.length) { box.replaceChildren(el('div', { class: 'empty', text: 'no lease: the card is the engines\'' })); return; }
    const rows = s.leases.map((l) => {
      const btn = el('button', { type: 'button', class: 'danger', text: 'Release', 'data-action': 'release' });
      btn.addEventListener('click', () => act('release lease ' + l.id, 'DELETE', 'admin/leases/' + encodeURIComponent(l.id), btn));
      return el('tr', { 'data-lease': l.id }, el('td', { text: l.label || 'pid ' + l.pid }), el('td', { class: 'num', text: gib(l.gib) }),
        el('td', { text: clock(l.granted_at) }), el('td', { text: l.evicted.length ? l.evicted.join(', ') : '–' }),
        el('td', null, btn));
    });
    box.replaceChildren(el('table', null, el('thead', null, el('tr', null, el('th', { text: 'Who' }), el('th', { text: 'GiB' }),
      el('th', { text: 'Since' }), el('th', { text: 'Evicted' }), el('th'))), el('tbody', null, ...rows)));
  }
  function renderAdapters(s) {
    if (!changed('adapters', s.adapters)) return;
    const a = s.adapters;
    const parts = [];
    parts.push(a.discovered.length
      ? el('table', null, el('thead', null, el('tr', null, el('th', { text: 'Discovered' }), el('th', { text: 'Base' }), el('th', { text: 'Rank' }))),
        el('tbody', null, ...a.discovered.map((d) => el('tr', { title: d.path }, el('td', { text: d.name }),
          el('td', { text: d.base }), el('td', { class: 'num', text: String(d.rank) })))))
      : el('div', { class: 'empty', text: 'no adapters discovered in watched folders' }));
    if (a.problems.length) {
      parts.push(el('h3', { class: 'small', text: 'Refused' }), el('ul', { class: 'refused' },
        ...a.problems.map((p) => el('li', { title: p.path }, el('code', { text: p.path.split('/').pop() }),
          el('div', { class: 'err small', text: p.reason })))));
    }
    $('adapters').replaceChildren(...parts);
  }
  let lastUsage = 0;
  async function renderUsage(s) {
    const box = $('usage');
    if (!s.gateway.usage_route) {
      if (changed('usage', 'none')) box.textContent = 'no users file: usage per user shows here once the gateway has users';
      return;
    }
    if (s.gateway.keys && !key()) {
      if (changed('usage', 'key')) box.textContent = 'usage per user needs the admin key';
      return;
    }
    if (Date.now() - lastUsage < USAGE_MS) return;
    lastUsage = Date.now();
    try {
      const r = await fetch('admin/usage', { headers: auth(), cache: 'no-store' });
      if (r.status === 404) { box.textContent = 'no users file'; sig.usage = '404'; return; }
      if (!r.ok) { box.textContent = 'usage: ' + (await errorText(r)); sig.usage = String(r.status); return; }
      const data = await r.json();
      if (changed('usage', data)) box.replaceChildren(...usageTables(data));
    } catch (e) { /* shown again on the next poll */ }
  }
  function usageTables(data) {
    // The usage route's shape belongs to it: draw every list of records it returns as a table.
    const out = [];
    for (const [name, value] of Object.entries(data)) {
      if (!Array.isArray(value) || !value.length || typeof value[0] !== 'object') continue;
      const cols = Object.keys(value[0]);
      out.push(el('h3', { class: 'small', text: name }), el('table', null,
        el('thead', null, el('tr', null, ...cols.map((k) => el('th', { text: k })))),
        el('tbody', null, ...value.map((row) => el('tr', null, ...cols.map((k) => el('td', { text: String(row[k] ?? '–') })))))));
    }
    return out.length ? out : [el('div', { class: 'empty', text: 'no usage recorded yet' })];
  }

  // --- the poll ----------------------------------------------------------------------------------
  function setLive(state, text) {
    const live = $('live');
    live.dataset.live = state;
    live.textContent = text;
  }
  function render(s) {
    if (startedAt !== null && s.gateway.started_at !== startedAt) toast('the gateway restarted at ' + clock(s.gateway.started_at), false);
    startedAt = s.gateway.started_at;
    snap = s;
    $('gw-info').textContent = 'v' + s.gateway.version + ' · up since ' + clock(s.gateway.started_at);
    $('gw-info').dataset.startedAt = String(s.gateway.started_at);
    renderCard(s);
    renderEngines(s);
    renderSwaps(s);
    renderLeases(s);
    renderAdapters(s);
    renderUsage(s);
    showMode();
    if (!rendered) {
      rendered = true;
      document.body.dataset.ready = '1';
      performance.mark('console-first-render');
    }
  }
  let polling = false;
  async function poll() {
    if (polling) return true;
    polling = true;
    try {
      const r = await fetch('console/snapshot', { headers: auth(), cache: 'no-store' });
      if (!r.ok) {
        setLive('refused', r.status === 401 || r.status === 403 ? 'needs a key: ' + (await errorText(r)) : 'error ' + r.status);
        return false;
      }
      render(await r.json());
      setLive('live', 'live');
      return true;
    } catch (e) {
      setLive('reconnecting', 'gateway unreachable: retrying…');
      return false;
    } finally {
      polling = false;
    }
  }
  async function loop() {
    for (;;) {
      const ok = await poll();
      await sleep(ok ? POLL_MS : RETRY_MS);
    }
  }
  showMode();
  loop();
})();

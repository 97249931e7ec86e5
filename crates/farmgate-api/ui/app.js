// farmgate dashboard: a single page with hash routes (#/, #/dut/<id>, #/job/<id>).
// Plain ES2020, no framework, no build step. xterm.js (served by the gateway at
// /ui/vendor/xterm.js) renders consoles when it loads; otherwise a <pre> shows the text.
'use strict';

(() => {
  const TOKEN_KEY = 'farmgate.token';
  const REFRESH_MS = 2000;
  const session = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    role: 'none',
  };
  let current = null; // the active view: {alive, cleanups: [fn]}

  // ------------------------------------------------------------------ helpers

  const $ = (sel, root = document) => root.querySelector(sel);

  /** el('tag', {attr: value, class: 'x', text: 'y'}, ...children) */
  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') e.textContent = v;
      else if (k === 'class') e.className = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    }
    return e;
  }

  const pad = (n) => String(n).padStart(2, '0');

  function fmtDate(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return '';
    let s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s}s`;
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 60) return `${m}m ${pad(s)}s`;
    let h = Math.floor(m / 60);
    m %= 60;
    if (h < 24) return `${h}h ${pad(m)}m`;
    const d = Math.floor(h / 24);
    h %= 24;
    return `${d}d ${pad(h)}h`;
  }

  /** Duration between two RFC 3339 dates; `to` missing means now. */
  function between(from, to) {
    if (!from) return '';
    const a = Date.parse(from);
    const b = to ? Date.parse(to) : Date.now();
    if (Number.isNaN(a) || Number.isNaN(b)) return '';
    return fmtDuration(b - a);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ------------------------------------------------------------------ banner

  let bannerSource = null;

  /** Shows a message in the banner; `source` lets a later success clear it. */
  function showBanner(msg, kind = 'error', source = null) {
    const b = $('#banner');
    $('#banner-text').textContent = msg;
    b.className = kind;
    b.hidden = false;
    bannerSource = source;
  }

  function clearBanner(source = null) {
    if (source !== null && bannerSource !== source) return;
    $('#banner').hidden = true;
    bannerSource = null;
  }

  // ------------------------------------------------------------------ API

  /** Calls the API; throws an Error whose message is the server's `error` text. */
  async function api(method, path, body, auth = false) {
    const headers = {};
    if (auth && session.token) headers.Authorization = `Bearer ${session.token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let r;
    try {
      r = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new Error(`${method} ${path}: the gateway does not answer (${e.message})`);
    }
    const text = await r.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!r.ok) {
      const why = data && typeof data.error === 'string' ? data.error : text.slice(0, 300) || r.statusText;
      const err = new Error(`${method} ${path}: ${r.status}: ${why}`);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ login

  function setRole(role) {
    session.role = role;
    const r = $('#role');
    r.textContent = role === 'none' ? 'not logged in' : role;
    r.dataset.role = role;
    r.className = `role role-${role}`;
    document.body.classList.toggle('role-admin', role === 'admin');
    document.body.classList.toggle('role-submit', role === 'submit');
    $('#logout-button').hidden = !session.token;
    $('#login-token').hidden = !!session.token;
    $('#login-button').hidden = !!session.token;
    document.dispatchEvent(new CustomEvent('farmgate-role'));
  }

  async function checkToken(token) {
    const r = await fetch('/api/v1/auth', {
      headers: { Authorization: `Bearer ${token}` },
      cache: 'no-store',
    });
    const text = await r.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch (_) {
      /* shown below */
    }
    if (!r.ok) {
      throw new Error(`GET /api/v1/auth: ${r.status}: ${(data && data.error) || text.slice(0, 200)}`);
    }
    if (!data || typeof data.role !== 'string') throw new Error(`GET /api/v1/auth: unexpected answer ${text.slice(0, 200)}`);
    return data.role;
  }

  async function login(token) {
    token = token.trim();
    if (!token) {
      showBanner('Enter a token to log in.');
      return;
    }
    try {
      const role = await checkToken(token);
      if (role === 'none') {
        showBanner('This token is not known to the gateway.');
        return;
      }
      session.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      $('#login-token').value = '';
      clearBanner();
      setRole(role);
    } catch (e) {
      showBanner(`Log in failed: ${e.message}`);
    }
  }

  function logout() {
    session.token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    setRole('none');
  }

  /** Runs an admin action from a button: errors go to the banner, success is said. */
  async function act(button, label, fn, after) {
    if (button) button.disabled = true;
    try {
      await fn();
      showBanner(`${label}: done`, 'info', 'action');
      setTimeout(() => clearBanner('action'), 4000);
      if (after) await after();
    } catch (e) {
      showBanner(`${label} failed: ${e.message}`);
    } finally {
      if (button) button.disabled = false;
    }
  }

  /** A button that asks to be clicked twice (within 4 s) before doing harm. */
  function confirmClick(button, run) {
    let armed = null;
    const label = button.textContent;
    button.addEventListener('click', () => {
      if (armed) {
        clearTimeout(armed);
        armed = null;
        button.textContent = label;
        button.classList.remove('armed');
        run();
        return;
      }
      button.textContent = `${label}? click again`;
      button.classList.add('armed');
      armed = setTimeout(() => {
        armed = null;
        button.textContent = label;
        button.classList.remove('armed');
      }, 4000);
    });
  }

  // ------------------------------------------------------------------ tables

  /** A cell: a string, or {text, href, cls, title}. */
  function fillCell(td, spec) {
    const s = typeof spec === 'object' && spec !== null ? spec : { text: spec === undefined || spec === null ? '' : String(spec) };
    const sig = JSON.stringify(s);
    if (td.dataset.sig === sig) return;
    td.dataset.sig = sig;
    td.className = s.cls || '';
    td.title = s.title || '';
    td.textContent = '';
    if (s.buttons) {
      for (const b of s.buttons) {
        td.appendChild(el('button', { type: 'button', class: b.cls || '', 'data-action': b.action, ...b.data, text: b.label }));
      }
    } else if (s.href) {
      td.appendChild(el('a', { href: s.href, text: s.text || '' }));
    } else {
      td.textContent = s.text || '';
    }
  }

  /**
   * Brings the rows of `tbody` to `rows` = [{key, cls, attrs, cells}], reusing rows by key
   * and touching only what changed (no flicker, selection kept).
   */
  function syncRows(tbody, rows, keyAttr, emptyText, columns) {
    const existing = new Map();
    for (const tr of Array.from(tbody.children)) existing.set(tr.getAttribute(keyAttr), tr);
    let prev = null;
    for (const row of rows) {
      let tr = existing.get(row.key);
      if (tr) existing.delete(row.key);
      else {
        tr = el('tr');
        tr.setAttribute(keyAttr, row.key);
      }
      tr.className = row.cls || '';
      for (const [k, v] of Object.entries(row.attrs || {})) {
        if (tr.getAttribute(k) !== String(v)) tr.setAttribute(k, v);
      }
      while (tr.children.length < row.cells.length) tr.appendChild(el('td'));
      row.cells.forEach((c, i) => fillCell(tr.children[i], c));
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== tr) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const tr of existing.values()) tr.remove();
    if (rows.length === 0) {
      const tr = el('tr', { class: 'empty' }, el('td', { colspan: columns, text: emptyText }));
      tr.setAttribute(keyAttr, '');
      tbody.appendChild(tr);
    }
  }

  function table(id, headers) {
    return el('table', { id, class: 'grid' },
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { text: h })))),
      el('tbody'));
  }

  const stateCell = (state, extra = '') => ({ text: state + extra, cls: `state state-${state}` });

  function jobStatusCell(j) {
    const s = j.status || j.state;
    return { text: s, cls: `status status-${s}`, title: j.reason || '' };
  }

  function jobRow(j) {
    const wait = j.started_at ? between(j.submitted_at, j.started_at) : between(j.submitted_at);
    const run = j.started_at ? between(j.started_at, j.finished_at) : '';
    const target = j.target ? (j.target.id || (j.target.tags || []).join(',')) : '';
    return {
      key: j.job_id,
      attrs: { 'data-state': j.state },
      cells: [
        { text: j.job_id, href: `#/job/${enc(j.job_id)}` },
        j.kind,
        jobStatusCell(j),
        j.dut_id ? { text: j.dut_id, href: `#/dut/${enc(j.dut_id)}` } : { text: target, title: 'wanted machine' },
        { text: fmtDate(j.submitted_at), title: j.submitted_at || '' },
        { text: fmtDate(j.started_at), title: j.started_at || '' },
        { text: fmtDate(j.finished_at), title: j.finished_at || '' },
        wait,
        run,
        { text: j.reason || '', cls: 'reason' },
      ],
    };
  }

  const JOB_HEADERS = ['job', 'kind', 'status', 'DUT / target', 'submitted', 'started', 'finished', 'waited', 'ran', 'reason'];

  // ------------------------------------------------------------------ views

  /** Polls `fn` every REFRESH_MS while the view lives; failures go to the banner. */
  function poll(view, fn) {
    let timer = null;
    const tick = async () => {
      if (!view.alive) return;
      try {
        await fn();
        clearBanner('poll');
        $('#last-refresh').textContent = `updated ${fmtDate(new Date().toISOString())}`;
      } catch (e) {
        showBanner(e.message, 'error', 'poll');
      }
      if (view.alive) timer = setTimeout(tick, REFRESH_MS);
    };
    view.cleanups.push(() => clearTimeout(timer));
    tick();
  }

  function portKey(pdu, port) {
    return `${pdu}\u0000${port}`;
  }

  function overviewView(view, main) {
    const duts = table('duts', ['id', 'name', 'state', 'tags', 'PDU:port', 'current job', 'in state for', 'unavailable']);
    const pdus = el('div', { id: 'pdus' });
    const queue = table('queue', JOB_HEADERS);
    const jobs = table('jobs', JOB_HEADERS);
    main.append(
      el('section', {}, el('h2', { text: 'DUTs' }), duts),
      el('section', {}, el('h2', { text: 'PDUs' }), pdus),
      el('section', {}, el('h2', {}, 'Queue ', el('span', { id: 'queue-count', class: 'count' })), queue),
      el('section', {}, el('h2', { text: 'Recent jobs' }), jobs),
    );

    let dutByPort = new Map();

    pdus.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-action]');
      if (!b) return;
      const { pdu, port } = b.dataset;
      const path = `/api/v1/pdu/${enc(pdu)}/port/${enc(port)}`;
      const label = `${b.textContent} ${pdu}:${port}`;
      const run = {
        'power-on': () => api('PATCH', path, { state: 'on' }, true),
        'power-off': () => api('PATCH', path, { state: 'off' }, true),
        reserve: () => api('PATCH', path, { reserved: true }, true),
        release: () => api('PATCH', path, { reserved: false }, true),
        discover: () => api('POST', '/api/v1/dut/discover', { pdu, port_id: port }, true),
      }[b.dataset.action];
      if (run) act(b, label, run, refresh);
    });

    async function refresh() {
      const [d, p, q, r] = await Promise.all([
        api('GET', '/api/v1/duts'),
        api('GET', '/api/v1/pdus'),
        api('GET', '/api/v1/jobs?state=QUEUED&limit=1000'),
        api('GET', '/api/v1/jobs?limit=50'),
      ]);
      if (!view.alive) return;
      const list = Object.values((d && d.duts) || {}).sort((a, b) => String(a.id).localeCompare(String(b.id)));
      dutByPort = new Map();
      const rows = list.map((u) => {
        if (u.pdu) dutByPort.set(portKey(u.pdu, u.pdu_port_id), u);
        const tags = [...(u.tags || []), ...(u.manual_tags || []).map((t) => `${t}*`)];
        const tr = u.training;
        const extra = tr && u.state === 'TRAINING' ? ` ${tr.rounds_done}/${tr.rounds_total}` : '';
        return {
          key: u.id,
          cls: u.unavailable ? 'unavailable' : '',
          attrs: { 'data-state': u.state },
          cells: [
            { text: u.id, href: `#/dut/${enc(u.id)}` },
            u.full_name || '',
            stateCell(u.state, extra),
            { text: tags.join(' '), title: 'tags (* = manual tags)' },
            u.pdu ? `${u.pdu}:${u.pdu_port_id ?? ''}` : '',
            u.current_job ? { text: u.current_job, href: `#/job/${enc(u.current_job)}` } : '',
            { text: between(u.state_since), title: u.state_since ? `since ${fmtDate(u.state_since)}` : '' },
            { text: u.unavailable || '', cls: u.unavailable ? 'warn' : '' },
          ],
        };
      });
      syncRows(duts.tBodies[0], rows, 'data-dut-id', 'no DUTs', 8);
      renderPdus(pdus, (p && p.pdus) || {}, dutByPort);
      const queued = ((q && q.jobs) || []).slice().sort((a, b) => String(a.submitted_at).localeCompare(String(b.submitted_at)));
      syncRows(queue.tBodies[0], queued.map(jobRow), 'data-job-id', 'the queue is empty', JOB_HEADERS.length);
      $('#queue-count').textContent = `(${queued.length})`;
      syncRows(jobs.tBodies[0], ((r && r.jobs) || []).map(jobRow), 'data-job-id', 'no jobs yet', JOB_HEADERS.length);
    }
    poll(view, refresh);
  }

  function fmtMeasure(m) {
    if (!m) return ['', ''];
    const w = m.power_w !== undefined && m.power_w !== null ? `${Number(m.power_w).toFixed(1)} W` : '';
    const e = m.energy_wh !== undefined && m.energy_wh !== null ? `${Number(m.energy_wh).toFixed(1)} Wh` : '';
    return [w, e];
  }

  function renderPdus(container, pdus, dutByPort) {
    const names = Object.keys(pdus).sort();
    const blocks = new Map();
    for (const b of Array.from(container.children)) blocks.set(b.dataset.pdu, b);
    let prev = null;
    for (const name of names) {
      const p = pdus[name];
      let block = blocks.get(name);
      if (block) blocks.delete(name);
      else {
        block = el('div', { class: 'pdu', 'data-pdu': name },
          el('h3', {}, el('span', { class: 'pdu-name', text: name }), ' ', el('span', { class: 'pdu-driver' }),
            ' ', el('span', { class: 'pdu-counters' })),
          el('div', { class: 'pdu-problem warn', hidden: true }),
          table('', ['port', 'label', 'DUT', 'state', 'last change', 'power', 'energy', 'reserved', 'actions']));
        block.querySelector('table').removeAttribute('id');
      }
      block.querySelector('.pdu-driver').textContent = `(${p.driver || '?'})`;
      const c = p.counters || {};
      block.querySelector('.pdu-counters').textContent =
        `switches ${c.switches_ok ?? 0} ok / ${c.switches_failed ?? 0} failed, reads ${c.reads_ok ?? 0} ok / ${c.reads_failed ?? 0} failed, ${c.retries ?? 0} retries, ${c.reinits ?? 0} reinits`;
      const problem = block.querySelector('.pdu-problem');
      const why = p.down ? `DOWN: ${p.down}` : p.error ? `error: ${p.error}` : '';
      const whyFull = why && p.last_ok ? `${why} (last answered ${fmtDate(p.last_ok)})` : why;
      if (problem.textContent !== whyFull) problem.textContent = whyFull;
      problem.hidden = !why;
      block.classList.toggle('down', !!p.down);
      const ports = Object.values(p.ports || {}).sort((a, b) =>
        String(a.port_id).localeCompare(String(b.port_id), undefined, { numeric: true }));
      const rows = ports.map((port) => {
        const dut = dutByPort.get(portKey(name, port.port_id));
        const [w, e] = fmtMeasure(port.measure);
        const data = { 'data-pdu': name, 'data-port': port.port_id };
        const buttons = [
          port.state === 'on'
            ? { action: 'power-off', label: 'off', data }
            : { action: 'power-on', label: 'on', data },
          port.reserved ? { action: 'release', label: 'release', data } : { action: 'reserve', label: 'reserve', data },
        ];
        if (!dut) buttons.push({ action: 'discover', label: 'discover', data });
        return {
          key: String(port.port_id),
          cls: port.reserved ? 'reserved' : '',
          cells: [
            String(port.port_id),
            port.label || '',
            dut ? { text: dut.full_name || dut.id, href: `#/dut/${enc(dut.id)}` } : '',
            { text: port.state, cls: `port-${port.state}` },
            { text: port.last_change ? `${between(port.last_change)} ago` : '', title: fmtDate(port.last_change) },
            w,
            e,
            port.reserved ? { text: 'reserved', cls: 'warn' } : '',
            { buttons, cls: 'admin-only port-actions' },
          ],
        };
      });
      syncRows(block.querySelector('tbody'), rows, 'data-port-id', 'no ports', 9);
      const want = prev ? prev.nextSibling : container.firstChild;
      if (want !== block) container.insertBefore(block, want);
      prev = block;
    }
    for (const b of blocks.values()) b.remove();
    if (names.length === 0 && !container.querySelector('.empty')) {
      container.appendChild(el('p', { class: 'empty', text: 'no PDUs' }));
    } else if (names.length) {
      const e = container.querySelector(':scope > .empty');
      if (e) e.remove();
    }
  }

  // ------------------------------------------------------------------ console

  /** Terminal output: xterm.js when it loaded, else a <pre> with the same text. */
  class ConsoleView {
    constructor(container) {
      this.container = container;
      this.term = null;
      this.dataHandlers = [];
      if (typeof window.Terminal === 'function') {
        try {
          const size = this.fitSize();
          this.term = new window.Terminal({
            convertEol: false,
            scrollback: 5000,
            fontFamily: 'monospace',
            fontSize: 13,
            cols: size.cols,
            rows: size.rows,
          });
          this.term.open(container);
          const forward = (d) => this.dataHandlers.forEach((h) => h(d));
          // xterm.js 4+ has onData; 3.x had on('data').
          if (typeof this.term.onData === 'function') this.term.onData(forward);
          else this.term.on('data', forward);
          container.classList.add('with-xterm');
        } catch (e) {
          console.warn('xterm.js failed, using the text fallback', e);
          this.term = null;
          container.textContent = '';
        }
      }
      if (!this.term) {
        this.pre = el('pre', { class: 'console-fallback', tabindex: '0', 'aria-label': 'console' });
        container.appendChild(this.pre);
        container.classList.add('with-fallback');
        this.line = null; // the span receiving text
        this.pendingEsc = '';
        this.pre.addEventListener('keydown', (ev) => this.fallbackKey(ev));
        this.pre.addEventListener('paste', (ev) => {
          const t = ev.clipboardData && ev.clipboardData.getData('text');
          if (t) {
            ev.preventDefault();
            this.dataHandlers.forEach((h) => h(t));
          }
        });
      }
    }

    fitSize() {
      const probe = el('span', { class: 'console-probe', text: 'W'.repeat(20) });
      this.container.appendChild(probe);
      const r = probe.getBoundingClientRect();
      probe.remove();
      const cw = r.width / 20 || 8;
      const ch = r.height || 16;
      const box = this.container.getBoundingClientRect();
      return {
        cols: Math.max(40, Math.floor((box.width - 20) / cw)),
        rows: Math.max(10, Math.floor((box.height || 480) / ch)),
      };
    }

    onData(fn) {
      this.dataHandlers.push(fn);
    }

    /** Raw console text (may hold escape sequences and partial lines). */
    write(text) {
      if (!text) return;
      if (this.term) {
        this.term.write(text);
        return;
      }
      this.appendFallback(text, null);
    }

    /** One line from the gateway itself, dimmed. */
    ctrl(text) {
      if (this.term) this.term.write(`\x1b[90m[farmgate] ${text}\x1b[0m\r\n`);
      else this.appendFallback(`[farmgate] ${text}\n`, 'ctrl');
    }

    /** A line standing out (the final status). */
    banner(text, ok) {
      if (this.term) this.term.write(`\x1b[1;${ok ? 32 : 31}m${text}\x1b[0m\r\n`);
      else this.appendFallback(`${text}\n`, ok ? 'final-ok' : 'final-bad');
    }

    appendFallback(text, cls) {
      const pre = this.pre;
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 30;
      // Escape sequences (colours, cursor moves) cannot be shown in text: drop them,
      // keeping an unfinished one for the next chunk.
      let t = this.pendingEsc + text;
      this.pendingEsc = '';
      const cut = t.lastIndexOf('\x1b');
      if (cut >= 0 && !/^\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*(\x07|\x1b\\)|[@-Z\\-_])/.test(t.slice(cut))) {
        this.pendingEsc = t.slice(cut);
        t = t.slice(0, cut);
      }
      t = t.replace(/\x1b\[[0-?]*[ -/]*[@-~]/g, '')
        .replace(/\x1b\][^\x07\x1b]*(\x07|\x1b\\)/g, '')
        .replace(/\x1b[@-Z\\-_]/g, '')
        .replace(/\r+\n/g, '\n')
        .replace(/\r/g, '')
        .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
      if (!t) return;
      if (cls) {
        pre.appendChild(el('span', { class: cls, text: t }));
        this.line = null;
      } else {
        if (!this.line) {
          this.line = document.createTextNode('');
          pre.appendChild(this.line);
        }
        this.line.appendData(t);
        if (this.line.length > 65536) this.line = null;
      }
      // Keep the page light: at most ~2 MB of console text.
      while (pre.childNodes.length > 1 && pre.textContent.length > 2_000_000) pre.firstChild.remove();
      if (stick) pre.scrollTop = pre.scrollHeight;
    }

    fallbackKey(ev) {
      if (!this.dataHandlers.length) return;
      const keys = {
        Enter: '\r', Backspace: '\x7f', Tab: '\t', Escape: '\x1b',
        ArrowUp: '\x1b[A', ArrowDown: '\x1b[B', ArrowRight: '\x1b[C', ArrowLeft: '\x1b[D',
        Home: '\x1b[H', End: '\x1b[F', Delete: '\x1b[3~', PageUp: '\x1b[5~', PageDown: '\x1b[6~',
      };
      let d = null;
      if (ev.ctrlKey && !ev.altKey && ev.key.length === 1) {
        const c = ev.key.toUpperCase().charCodeAt(0);
        if (c >= 64 && c <= 95) d = String.fromCharCode(c - 64);
        if (ev.key === 'c' && window.getSelection().toString()) d = null; // copy
        if (ev.key === 'v') return; // paste event
      } else if (keys[ev.key]) d = keys[ev.key];
      else if (ev.key.length === 1 && !ev.metaKey) d = (ev.altKey ? '\x1b' : '') + ev.key;
      if (d !== null) {
        ev.preventDefault();
        this.dataHandlers.forEach((h) => h(d));
      }
    }

    focus() {
      if (this.term) this.term.focus();
      else this.pre.focus();
    }

    dispose() {
      if (this.term) {
        try {
          this.term.dispose();
        } catch (_) {
          /* already gone */
        }
      }
      this.container.textContent = '';
    }
  }

  /** Writes one job event to a console; returns the session_end payload when it is one. */
  function writeEvent(con, ev) {
    const payload = typeof ev.payload === 'string' ? ev.payload : String(ev.payload ?? '');
    if (ev.msg_type === 'job_io') {
      con.write(`${payload.replace(/\r?\n$/, '')}\r\n`);
    } else if (ev.msg_type === 'ctrl') {
      con.ctrl(payload.replace(/\r?\n$/, ''));
    } else if (ev.msg_type === 'session_end') {
      let end = null;
      try {
        end = JSON.parse(payload);
      } catch (_) {
        end = { status: payload };
      }
      const st = (end && end.status) || 'UNKNOWN';
      con.banner(`[farmgate] job finished: ${st}${end && end.reason ? ` (${end.reason})` : ''}`, st === 'PASS' || st === 'COMPLETE');
      return end || {};
    }
    return null;
  }

  function parseNdjson(text) {
    const out = [];
    for (const line of text.split('\n')) {
      if (!line.trim()) continue;
      try {
        out.push(JSON.parse(line));
      } catch (e) {
        throw new Error(`job events: a line is not JSON: ${line.slice(0, 100)}`);
      }
    }
    return out;
  }

  // ------------------------------------------------------------------ job page

  function detailsList(pairs, cls = 'details') {
    const dl = el('dl', { class: cls });
    for (const [k, v, cls] of pairs) {
      dl.append(el('dt', { text: k }), el('dd', { class: cls || '', 'data-field': k }, v === undefined || v === null ? '' : v));
    }
    return dl;
  }

  function jobView(view, main, id) {
    const details = el('div', { id: 'job-details' });
    const final = el('div', { id: 'job-final', hidden: true });
    const cancel = el('button', { type: 'button', class: 'submit-only danger', 'data-action': 'cancel', text: 'Cancel job' });
    const stream = el('span', { id: 'stream-status', class: 'muted' });
    const box = el('div', { id: 'console', class: 'console' });
    main.append(
      el('h2', {}, 'Job ', el('span', { id: 'job-id', text: id })),
      details,
      el('div', { class: 'actions' }, cancel),
      final,
      el('div', { class: 'console-head' }, el('strong', { text: 'Console' }), ' ', stream),
      box,
    );
    confirmClick(cancel, () => act(cancel, `cancel job ${id}`, () => api('POST', `/api/v1/job/${enc(id)}/cancel`, undefined, true), refresh));
    const con = new ConsoleView(box);
    view.cleanups.push(() => con.dispose());
    let finished = false;

    function showFinal(end) {
      const st = end.status || 'UNKNOWN';
      final.textContent = `Final status: ${st}${end.reason ? ` — ${end.reason}` : ''}`;
      final.className = `final status-${st}`;
      final.dataset.status = st;
      final.hidden = false;
    }

    async function refresh() {
      const j = await api('GET', `/api/v1/job/${enc(id)}`);
      if (!view.alive) return;
      const target = j.target ? (j.target.id ? `id ${j.target.id}` : `tags ${(j.target.tags || []).join(', ') || '(any)'}`) : '';
      details.replaceChildren(detailsList([
        ['kind', j.kind],
        ['state', j.state, `state state-${j.state}`],
        ['status', j.status || '', j.status ? `status status-${j.status}` : ''],
        ['reason', j.reason || ''],
        ['DUT', j.dut_id ? el('a', { href: `#/dut/${enc(j.dut_id)}`, text: j.dut_id }) : ''],
        ['target', target],
        ['submitted', fmtDate(j.submitted_at)],
        ['started', `${fmtDate(j.started_at)}${j.started_at ? ` (waited ${between(j.submitted_at, j.started_at)})` : ''}`],
        ['finished', `${fmtDate(j.finished_at)}${j.started_at ? ` (ran ${between(j.started_at, j.finished_at)})` : ''}`],
        ['files', el('span', {},
          el('a', { href: `/api/v1/job/${enc(id)}/console.log`, text: 'console.log' }), ' ',
          el('a', { href: `/api/v1/job/${enc(id)}/events`, text: 'events (NDJSON)' }))],
      ]));
      cancel.hidden = j.state === 'FINISHED';
      if (j.state === 'FINISHED') {
        finished = true;
        if (j.status && final.hidden) showFinal({ status: j.status, reason: j.reason });
      }
    }

    // The record: every 2 s until the job is over.
    let timer = null;
    const tick = async () => {
      try {
        await refresh();
        clearBanner('poll');
      } catch (e) {
        showBanner(e.message, 'error', 'poll');
      }
      if (view.alive && !finished) timer = setTimeout(tick, REFRESH_MS);
    };
    view.cleanups.push(() => clearTimeout(timer));
    tick();

    // The events: one follow stream, resumed after the last seq when it drops.
    const abort = new AbortController();
    view.cleanups.push(() => abort.abort());
    (async () => {
      let after = 0;
      let delay = 500;
      let done = false;
      const handle = (ev) => {
        if (typeof ev.seq === 'number' && ev.seq <= after) return;
        if (typeof ev.seq === 'number') after = ev.seq;
        const end = writeEvent(con, ev);
        if (end) {
          done = true;
          showFinal(end);
          finished = true;
          cancel.hidden = true;
          refresh().catch(() => {});
        }
      };
      while (view.alive && !done) {
        stream.textContent = after ? 'reconnecting…' : 'connecting…';
        try {
          const r = await fetch(`/api/v1/job/${enc(id)}/events?follow=true&after=${after}`, {
            signal: abort.signal,
            cache: 'no-store',
          });
          if (!r.ok) {
            const text = await r.text();
            let why = text.slice(0, 300);
            try {
              why = JSON.parse(text).error || why;
            } catch (_) {
              /* not JSON */
            }
            const err = new Error(`job events: ${r.status}: ${why}`);
            if (r.status === 404 || r.status === 400) {
              showBanner(err.message);
              stream.textContent = 'no events';
              return;
            }
            throw err;
          }
          stream.textContent = 'live';
          delay = 500;
          if (r.body && r.body.getReader) {
            const reader = r.body.getReader();
            view.cleanups.push(() => reader.cancel().catch(() => {}));
            const dec = new TextDecoder();
            let buf = '';
            for (;;) {
              const { value, done: eof } = await reader.read();
              if (eof) break;
              buf += dec.decode(value, { stream: true });
              let nl;
              while ((nl = buf.indexOf('\n')) >= 0) {
                const line = buf.slice(0, nl);
                buf = buf.slice(nl + 1);
                if (line.trim()) handle(JSON.parse(line));
              }
            }
          } else {
            parseNdjson(await r.text()).forEach(handle);
          }
        } catch (e) {
          if (!view.alive || abort.signal.aborted) return;
          stream.textContent = `stream dropped (${e.message}), reconnecting…`;
        }
        if (!done && view.alive) {
          await sleep(delay);
          delay = Math.min(delay * 2, 5000);
        }
      }
      if (done) stream.textContent = 'finished';
    })();
  }

  // ------------------------------------------------------------------ DUT page

  function dutView(view, main, id) {
    const details = el('div', { id: 'dut-details' });
    const port = el('div', { id: 'dut-port' });
    const mk = (action, label, cls = '') =>
      el('button', { type: 'button', 'data-action': action, class: cls, text: label });
    const buttons = {
      retire: mk('retire', 'Retire', 'danger'),
      activate: mk('activate', 'Activate'),
      'quick-check': mk('quick-check', 'Quick check'),
      cancel: mk('cancel', 'Cancel current job', 'danger'),
      'power-on': mk('power-on', 'Power on'),
      'power-off': mk('power-off', 'Power off', 'danger'),
      reserve: mk('reserve', 'Reserve port'),
      release: mk('release', 'Release port'),
    };
    const actions = el('div', { id: 'dut-actions', class: 'actions admin-only' }, Object.values(buttons));
    const mode = el('span', { id: 'console-mode', class: 'muted' });
    const wsStatus = el('span', { id: 'console-status', class: 'muted' });
    const box = el('div', { id: 'console', class: 'console' });
    main.append(
      el('h2', {}, 'DUT ', el('span', { id: 'dut-id', text: id }), ' ', el('span', { id: 'dut-state' })),
      details,
      port,
      actions,
      el('div', { class: 'console-head' }, el('strong', { text: 'Serial console' }), ' ', wsStatus, ' ', mode),
      box,
    );
    const con = new ConsoleView(box);
    view.cleanups.push(() => con.dispose());

    let dut = null;
    let pdu = null;
    const portPath = () => `/api/v1/pdu/${enc(dut.pdu)}/port/${enc(dut.pdu_port_id)}`;
    let reconnectConsole = () => {};
    const run = (b, label, fn) => act(b, `${label} ${id}`, fn, async () => {
      await refresh();
      reconnectConsole();
    });
    buttons.retire.addEventListener('click', () => run(buttons.retire, 'retire', () => api('PATCH', `/api/v1/dut/${enc(id)}`, { is_retired: true }, true)));
    buttons.activate.addEventListener('click', () => run(buttons.activate, 'activate', () => api('PATCH', `/api/v1/dut/${enc(id)}`, { is_retired: false }, true)));
    buttons['quick-check'].addEventListener('click', () => run(buttons['quick-check'], 'quick check', () => api('POST', `/api/v1/dut/${enc(id)}/quick_check`, undefined, true)));
    confirmClick(buttons.cancel, () => run(buttons.cancel, 'cancel the job of', () => api('POST', `/api/v1/job/${enc(dut.current_job)}/cancel`, undefined, true)));
    buttons['power-on'].addEventListener('click', () => run(buttons['power-on'], 'power on', () => api('PATCH', portPath(), { state: 'on' }, true)));
    confirmClick(buttons['power-off'], () => run(buttons['power-off'], 'power off', () => api('PATCH', portPath(), { state: 'off' }, true)));
    buttons.reserve.addEventListener('click', () => run(buttons.reserve, 'reserve the port of', () => api('PATCH', portPath(), { reserved: true }, true)));
    buttons.release.addEventListener('click', () => run(buttons.release, 'release the port of', () => api('PATCH', portPath(), { reserved: false }, true)));

    async function refresh() {
      const [d, p] = await Promise.all([api('GET', `/api/v1/dut/${enc(id)}`), api('GET', '/api/v1/pdus')]);
      if (!view.alive) return;
      dut = d;
      const pd = d.pdu && p && p.pdus ? p.pdus[d.pdu] : null;
      pdu = pd && pd.ports ? pd.ports[d.pdu_port_id] : null;
      const st = $('#dut-state');
      st.textContent = d.state;
      st.className = `state state-${d.state}`;
      const tr = d.training;
      details.replaceChildren(detailsList([
        ['name', d.full_name || ''],
        ['state', `${d.state}${d.state_since ? ` for ${between(d.state_since)} (since ${fmtDate(d.state_since)})` : ''}`, `state state-${d.state}`],
        ['unavailable', d.unavailable || '', d.unavailable ? 'warn' : ''],
        ['current job', d.current_job ? el('a', { href: `#/job/${enc(d.current_job)}`, text: d.current_job }) : ''],
        ['training', tr ? `${tr.rounds_done}/${tr.rounds_total} rounds done, ${tr.rounds_passed} passed (${tr.rounds_needed} needed)` : ''],
        ['tags', (d.tags || []).join(' ')],
        ['manual tags', (d.manual_tags || []).join(' ')],
        ['base name', d.base_name || ''],
        ['ready for service', String(!!d.ready_for_service)],
        ['retired', String(!!d.is_retired)],
        ['IP address', d.ip_address || ''],
        ['tty', d.local_tty_device || ''],
        ['first seen', fmtDate(d.first_seen)],
        ['comment', d.comment || ''],
      ], 'details two'));
      const [w, e] = fmtMeasure(pdu && pdu.measure);
      port.replaceChildren(d.pdu ? detailsList([
        ['PDU port', `${d.pdu}:${d.pdu_port_id ?? ''}${pdu && pdu.label ? ` (${pdu.label})` : ''}`],
        ['power', pdu ? `${pdu.state}${pdu.last_change ? `, changed ${between(pdu.last_change)} ago` : ''}` : 'unknown port', pdu ? `port-${pdu.state}` : 'warn'],
        ['measure', [w, e].filter(Boolean).join(', ')],
        ['reserved', pdu ? String(!!pdu.reserved) : '', pdu && pdu.reserved ? 'warn' : ''],
        ['off delay', d.pdu_off_delay !== undefined ? `${d.pdu_off_delay} s` : ''],
        ['PDU problem', pd && (pd.down || pd.error) ? (pd.down || pd.error) : '', pd && (pd.down || pd.error) ? 'warn' : ''],
      ], 'details two') : el('p', { class: 'muted', text: 'no PDU port' }));
      buttons.retire.hidden = !!d.is_retired;
      buttons.activate.hidden = !d.is_retired;
      buttons.cancel.hidden = !d.current_job;
      const hasPort = !!(d.pdu && pdu);
      buttons['power-on'].hidden = !hasPort || pdu.state === 'on';
      buttons['power-off'].hidden = !hasPort || pdu.state === 'off';
      buttons.reserve.hidden = !hasPort || !!pdu.reserved;
      buttons.release.hidden = !hasPort || !pdu.reserved;
      return d;
    }

    // Console: the current job's history first, then the live stream.
    let ws = null;
    let rw = false;
    con.onData((d) => {
      if (rw && ws && ws.readyState === WebSocket.OPEN) ws.send(d);
    });
    const setMode = (text, cls) => {
      mode.textContent = text;
      mode.className = cls;
    };
    // The token goes once per connection (the server takes later text as keystrokes).
    let tokenSent = false;
    const sendToken = () => {
      if (ws && ws.readyState === WebSocket.OPEN && session.role === 'admin' && session.token) {
        if (!tokenSent) {
          tokenSent = true;
          ws.send(JSON.stringify({ token: session.token }));
        }
      } else if (session.role !== 'admin') {
        rw = false;
        setMode('read-only (log in as admin to type)', 'mode mode-ro');
      }
    };
    /** A new connection, for a new answer on who may type (after logging out, retiring…). */
    reconnectConsole = () => {
      if (ws && ws.readyState === WebSocket.OPEN) ws.close();
    };
    const onRole = () => {
      if (tokenSent && session.role !== 'admin') reconnectConsole();
      sendToken();
    };
    document.addEventListener('farmgate-role', onRole);
    view.cleanups.push(() => document.removeEventListener('farmgate-role', onRole));

    function connect(delay) {
      if (!view.alive) return;
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const decoder = new TextDecoder();
      let opened = false;
      wsStatus.textContent = 'connecting…';
      try {
        ws = new WebSocket(`${proto}//${location.host}/api/v1/dut/${enc(id)}/console/ws`);
      } catch (e) {
        showBanner(`console: ${e.message}`);
        return;
      }
      ws.binaryType = 'arraybuffer';
      tokenSent = false;
      ws.onopen = () => {
        opened = true;
        wsStatus.textContent = 'live';
        wsStatus.className = 'live';
        sendToken();
      };
      ws.onmessage = (m) => {
        if (typeof m.data === 'string') {
          let msg = null;
          if (m.data.startsWith('{')) {
            try {
              msg = JSON.parse(m.data);
            } catch (_) {
              msg = null;
            }
          }
          if (msg && typeof msg.mode === 'string') {
            rw = msg.mode === 'read-write';
            setMode(rw ? 'read-write: type in the console' : `read-only${msg.reason ? `: ${msg.reason}` : ''}`,
              `mode ${rw ? 'mode-rw' : 'mode-ro'}`);
            if (rw) con.focus();
          } else if (msg && typeof msg.error === 'string') {
            showBanner(`console: ${msg.error}`);
          } else {
            con.write(m.data.replace(/\r?\n/g, '\r\n'));
          }
          return;
        }
        const text = decoder.decode(new Uint8Array(m.data), { stream: true });
        con.write(text.replace(/\r?\n/g, '\r\n'));
      };
      ws.onclose = (ev) => {
        rw = false;
        setMode('', 'mode');
        if (!view.alive) return;
        wsStatus.className = 'warn';
        wsStatus.textContent = `disconnected${ev.reason ? `: ${ev.reason}` : ''}; reconnecting…`;
        const next = opened ? 1000 : Math.min(delay * 2, 10000);
        setTimeout(() => connect(next), opened ? 1000 : delay);
      };
    }
    view.cleanups.push(() => {
      if (ws) {
        ws.onclose = null;
        ws.close();
      }
    });

    (async () => {
      let d = null;
      try {
        d = await refresh();
      } catch (e) {
        showBanner(e.message, 'error', 'poll');
      }
      if (d && d.current_job) {
        try {
          const r = await fetch(`/api/v1/job/${enc(d.current_job)}/events`, { cache: 'no-store' });
          if (r.ok) {
            con.ctrl(`history of job ${d.current_job}`);
            parseNdjson(await r.text()).forEach((ev) => writeEvent(con, ev));
            con.ctrl('live console from here');
          } else {
            showBanner(`job ${d.current_job} history: ${r.status}`);
          }
        } catch (e) {
          showBanner(`job ${d.current_job} history: ${e.message}`);
        }
      }
      if (!view.alive) return;
      connect(1000);
      let timer = null;
      const tick = async () => {
        try {
          await refresh();
          clearBanner('poll');
        } catch (e) {
          showBanner(e.message, 'error', 'poll');
        }
        if (view.alive) timer = setTimeout(tick, REFRESH_MS);
      };
      timer = setTimeout(tick, REFRESH_MS);
      view.cleanups.push(() => clearTimeout(timer));
    })();
  }

  // ------------------------------------------------------------------ router

  function route() {
    if (current) {
      current.alive = false;
      for (const f of current.cleanups) {
        try {
          f();
        } catch (_) {
          /* best effort */
        }
      }
    }
    clearBanner('poll');
    const view = { alive: true, cleanups: [] };
    current = view;
    const main = $('#main');
    main.textContent = '';
    const hash = location.hash.replace(/^#\/?/, '');
    const [kind, ...rest] = hash.split('/');
    const id = rest.length ? decodeURIComponent(rest.join('/')) : '';
    const crumbs = $('#crumbs');
    crumbs.textContent = '';
    document.body.dataset.view = kind || 'overview';
    if (kind === 'dut' && id) {
      crumbs.append(' / ', el('span', { text: `DUT ${id}` }));
      document.title = `DUT ${id} – farmgate`;
      dutView(view, main, id);
    } else if (kind === 'job' && id) {
      crumbs.append(' / ', el('span', { text: `job ${id}` }));
      document.title = `job ${id} – farmgate`;
      jobView(view, main, id);
    } else {
      document.title = 'farmgate';
      overviewView(view, main);
    }
  }

  // ------------------------------------------------------------------ start

  function start() {
    $('#login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      login($('#login-token').value);
    });
    $('#logout-button').addEventListener('click', logout);
    $('#banner-close').addEventListener('click', () => clearBanner());
    window.addEventListener('hashchange', route);
    setRole('none');
    if (session.token) {
      checkToken(session.token)
        .then((role) => setRole(role))
        .catch((e) => showBanner(`Checking the saved token: ${e.message}`));
    }
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

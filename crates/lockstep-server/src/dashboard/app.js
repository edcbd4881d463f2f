// lockstep dashboard: fetches /v1/dashboard and /v1/alerts, draws cards, two SVG charts,
// the instance grid and the alert feed, and stays live over /v1/events/stream (the session
// cookie authenticates it). No framework, no library: everything here is reviewed code.
'use strict';
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';
  const STATUSES = ['current', 'draining', 'stale', 'missing', 'unknown'];
  const EVENT_KINDS = [
    'release_registered', 'release_rolled_back', 'instance_missing', 'instance_deregistered',
    'alert_opened', 'alert_escalated', 'alert_resolved', 'alert_acknowledged', 'token_revoked',
  ];
  const view = { env: '', service: '', status: '', page: 1, perPage: 60 };
  let services = [];
  let alertsApi = true;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function secs(s) {
    if (s === null || s === undefined) return '–';
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  const short = (v) => (v || '').slice(0, 8);

  async function api(path, opts) {
    const o = Object.assign({ credentials: 'same-origin', headers: {} }, opts || {});
    if (o.method && o.method !== 'GET') o.headers['X-CSRF-Token'] = csrf;
    const r = await fetch(path, o);
    // The token was revoked or the cookie is gone: back to the sign-in form.
    if (r.status === 401) { location.reload(); throw new Error('signed out'); }
    return r;
  }

  // ---- data ----
  let inflight = false;
  let again = false;
  async function refresh() {
    if (inflight) { again = true; return; }
    inflight = true;
    try {
      const q = new URLSearchParams({ page: view.page, per_page: view.perPage });
      if (view.env) q.set('env', view.env);
      if (view.service) q.set('service', view.service);
      if (view.status) q.set('status', view.status);
      const r = await api(`/v1/dashboard?${q}`);
      if (r.ok) render(await r.json());
      await loadAlerts();
    } catch (e) {
      console.warn('refresh failed', e);
    } finally {
      inflight = false;
      if (again) { again = false; refresh(); }
    }
  }
  let timer = null;
  function schedule() {
    // Events come in bursts (a release, then its alerts): one fetch for the burst.
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh(); }, 150);
  }

  // ---- rendering ----
  function render(d) {
    const c = d.counts;
    $('v-total').textContent = d.total_workers;
    for (const s of ['current', 'draining', 'stale', 'missing']) $(`v-${s}`).textContent = c[s];
    $('v-alerts').textContent = d.active_alerts;
    $('v-health').textContent = d.health_score.toFixed(1);
    $('v-health').parentElement.dataset.level =
      d.health_score >= 95 ? 'good' : d.health_score >= 80 ? 'fair' : 'poor';
    services = d.services;
    fillFilters();
    statusChart(c);
    deployChart(d.deploys);
    grid(d.instances);
    $('generated').textContent = `updated ${new Date(d.generated_at).toLocaleTimeString()}`;
    $('drift-check').textContent = d.last_drift_check
      ? `· last drift check ${new Date(d.last_drift_check).toLocaleTimeString()}` : '';
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
    if (!document.body.dataset.firstRenderMs) {
      // Time from navigation start to the first full frame with data (docs/benchmarks.md).
      requestAnimationFrame(() => {
        document.body.dataset.firstRenderMs = String(Math.round(performance.now()));
      });
    }
  }

  function fillSelect(sel, values, current) {
    const have = Array.from(sel.options).slice(1).map((o) => o.value).join('\n');
    if (have === values.join('\n')) return;
    sel.replaceChildren(el('option', { value: '' }, 'all'),
      ...values.map((v) => el('option', { value: v }, v)));
    sel.value = values.includes(current) ? current : '';
  }
  function fillFilters() {
    const envs = [...new Set(services.map((s) => s.env))].sort();
    const svcs = [...new Set(services.filter((s) => !view.env || s.env === view.env)
      .map((s) => s.service))].sort();
    fillSelect($('f-env'), envs, view.env);
    fillSelect($('f-service'), svcs, view.service);
  }

  function statusChart(c) {
    const w = 320, h = 160, pad = 22, bw = (w - pad) / STATUSES.length;
    const max = Math.max(1, ...STATUSES.map((s) => c[s]));
    const root = svg('svg', { viewBox: `0 0 ${w} ${h + 30}`, class: 'chart' });
    STATUSES.forEach((s, i) => {
      const bh = Math.round((c[s] / max) * (h - pad));
      const x = pad / 2 + i * bw + 6;
      const g = svg('g', { class: `bar s-${s}` });
      g.append(svg('title', {}, `${s}: ${c[s]}`));
      g.append(svg('rect', { x, y: h - bh, width: bw - 12, height: Math.max(bh, 1), rx: 3 }));
      g.append(svg('text', { x: x + (bw - 12) / 2, y: h - bh - 4, class: 'num' }, String(c[s])));
      g.append(svg('text', { x: x + (bw - 12) / 2, y: h + 18, class: 'axis' }, s));
      root.append(g);
    });
    $('status-chart').replaceChildren(root);
    $('status-chart').setAttribute('aria-label',
      'instances per status: ' + STATUSES.map((s) => `${s} ${c[s]}`).join(', '));
  }

  function deployChart(deploys) {
    const fig = $('deploy-chart');
    if (!deploys.length) { fig.replaceChildren(el('p', { class: 'note' }, 'no releases yet')); return; }
    const list = deploys.slice(0, 12).reverse();
    const w = 320, h = 160, bw = Math.min(w / list.length, 48);
    const done = list.filter((d) => d.convergence_secs !== null).map((d) => d.convergence_secs);
    const max = Math.max(1, ...done);
    const root = svg('svg', { viewBox: `0 0 ${w} ${h + 30}`, class: 'chart' });
    list.forEach((d, i) => {
      const pending = d.convergence_secs === null;
      const status = d.superseded ? 'replaced before converging'
        : pending ? 'not converged yet' : `converged in ${secs(d.convergence_secs)}`;
      const bh = pending ? h - 20 : Math.max(2, Math.round((d.convergence_secs / max) * (h - 20)));
      const x = i * bw + 3;
      const g = svg('g', { class: d.superseded ? 'bar superseded' : pending ? 'bar pending' : 'bar converged' });
      g.append(svg('title', {}, `${d.env}/${d.service} ${d.version} ` +
        `registered ${new Date(d.registered_at).toLocaleString()}: ${status}`));
      g.append(svg('rect', { x, y: h - bh, width: Math.max(bw - 6, 2), height: bh, rx: 2 }));
      g.append(svg('text', { x: x + (bw - 6) / 2, y: h - bh - 4, class: 'num' },
        d.superseded ? '×' : pending ? '…' : secs(d.convergence_secs)));
      g.append(svg('text', { x: x + (bw - 6) / 2, y: h + 18, class: 'axis' }, d.service.slice(0, 10)));
      root.append(g);
    });
    const table = el('table', { class: 'deploys' },
      el('caption', { class: 'sr-only' }, 'recent deploys'),
      el('thead', {}, el('tr', {}, el('th', {}, 'service'), el('th', {}, 'version'),
        el('th', {}, 'registered'), el('th', {}, 'converged in'))),
      el('tbody', {}, ...deploys.slice(0, 5).map((d) => el('tr', {},
        el('td', {}, `${d.env}/${d.service}`), el('td', { class: 'mono' }, d.version),
        el('td', {}, new Date(d.registered_at).toLocaleTimeString()),
        el('td', {}, d.superseded ? 'replaced' : d.convergence_secs === null ? 'not yet'
          : secs(d.convergence_secs))))));
    fig.replaceChildren(root, table);
  }

  function grid(page) {
    const cells = page.items.map((i) => el('div', {
      class: `cell s-${i.status}`, role: 'listitem', 'data-instance': i.instance_id,
      'data-status': i.status,
      'aria-label': `${i.instance_id}: ${i.status}, version ${short(i.version_id)}` +
        (i.drift_secs ? `, drifting for ${secs(i.drift_secs)}` : ''),
      title: `${i.env}/${i.service} ${i.instance_id}${i.host ? ' on ' + i.host : ''}`,
    },
    el('span', { class: 'id' }, i.instance_id),
    el('span', { class: 'svc' }, `${i.env}/${i.service}`),
    el('span', { class: 'ver mono' }, short(i.version_id)),
    el('span', { class: 'st' }, i.status + (i.drift_secs ? ` · ${secs(i.drift_secs)}` : ''))));
    $('grid').replaceChildren(...cells);
    const pages = Math.max(1, Math.ceil(page.total / page.per_page));
    $('inst-count').textContent = `(${page.total})`;
    $('page-info').textContent = `page ${page.page} of ${pages}`;
    $('prev').disabled = page.page <= 1;
    $('next').disabled = page.page >= pages;
  }

  // ---- alerts ----
  async function loadAlerts() {
    if (!alertsApi) return;
    const r = await api('/v1/alerts?state=open&limit=50');
    if (r.status === 404) {
      alertsApi = false;
      $('alerts-note').textContent = 'This registry runs no drift detector: no alerts.';
      return;
    }
    if (!r.ok) return;
    const { alerts } = await r.json();
    $('alerts-note').textContent = alerts.length ? '' : 'No open alert.';
    $('alerts').replaceChildren(...alerts.map(alertItem));
  }
  function alertItem(a) {
    const li = el('li', { class: `alert sev-${a.severity}`, 'data-alert': a.alert_id },
      el('span', { class: 'sev' }, a.severity),
      el('span', { class: 'msg' }, a.message),
      el('span', { class: 'meta' }, `${a.env}/${a.service} · ${a.instance_id} · ` +
        `${short(a.current_version)} → ${short(a.expected_version) || '?'} · ${a.drift_duration}`));
    if (a.acknowledged) {
      li.append(el('span', { class: 'acked' }, `acknowledged by ${a.acknowledged_by || '?'}`));
    } else {
      const b = el('button', { type: 'button', class: 'ack',
        'aria-label': `Acknowledge alert for ${a.instance_id}` }, 'Acknowledge');
      b.addEventListener('click', () => ack(a.alert_id, b));
      li.append(b);
    }
    return li;
  }
  async function ack(id, button) {
    button.disabled = true;
    const r = await api(`/v1/alerts/${encodeURIComponent(id)}/ack`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}',
    });
    if (!r.ok) {
      button.disabled = false;
      $('alerts-note').textContent = r.status === 403
        ? 'Acknowledging needs the operator role.' : `Acknowledge failed (${r.status}).`;
      return;
    }
    schedule();
  }

  // ---- live ----
  let source = null;
  function connect() {
    source = new EventSource('/v1/events/stream');
    source.onopen = () => {
      $('live').textContent = 'live';
      $('live').className = 'live on';
      schedule(); // whatever happened while disconnected
    };
    source.onerror = () => {
      $('live').textContent = 'reconnecting…';
      $('live').className = 'live off';
      // The browser retries by itself unless the server answered with an error status.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(() => { refresh(); connect(); }, 3000);
      }
    };
    source.onmessage = schedule;
    for (const k of EVENT_KINDS) source.addEventListener(k, schedule);
  }

  // ---- controls ----
  function onFilter() {
    view.env = $('f-env').value;
    view.service = $('f-service').value;
    view.status = $('f-status').value;
    view.page = 1;
    refresh();
  }
  $('f-env').addEventListener('change', () => { $('f-service').value = ''; onFilter(); });
  $('f-service').addEventListener('change', onFilter);
  $('f-status').addEventListener('change', onFilter);
  $('filters').addEventListener('submit', (e) => e.preventDefault());
  $('prev').addEventListener('click', () => { view.page = Math.max(1, view.page - 1); refresh(); });
  $('next').addEventListener('click', () => { view.page += 1; refresh(); });
  $('logout').addEventListener('click', async () => {
    await fetch('/logout', { method: 'POST', credentials: 'same-origin' });
    location.reload();
  });

  refresh();
  connect();
  // Heartbeats that change an instance's status write no event: a slow poll catches them.
  setInterval(refresh, 15000);
})();

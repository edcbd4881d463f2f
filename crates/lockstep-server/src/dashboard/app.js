// lockstep dashboard: fetches /v1/dashboard and /v1/alerts, draws cards, the rollouts panel,
// three SVG charts, the instance grid and the alert feed, and stays live over
// /v1/events/stream (the session cookie authenticates it). No framework, no library:
// everything here is reviewed code.
'use strict';
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';
  const STATUSES = ['current', 'draining', 'stale', 'missing', 'unknown'];
  const EVENT_KINDS = [
    'release_registered', 'release_rolled_back', 'instance_missing', 'instance_deregistered',
    'alert_opened', 'alert_escalated', 'alert_resolved', 'alert_acknowledged', 'token_revoked',
    // rollouts: the coordinator's own events and each node's steps
    'rollout_started', 'rollout_phase', 'rollout_completed', 'rollout_rolled_back',
    'rollout_aborted', 'rollout_frozen', 'rollout_retried', 'rollout_abort_requested',
    'worker_update_started', 'worker_backup_created', 'worker_update_completed',
    'worker_update_failed', 'worker_rollback_started', 'worker_rollback_completed',
    'worker_rollback_failed', 'worker_version_checked', 'rollout_node_failed',
  ];
  // Steps of a node in a rollout, as the grid spells them for an instance.
  const STEP_LABEL = {
    pending: (id) => `waiting for rollout ${id}`,
    updating: (id) => `updating in rollout ${id}`,
    updated: (id) => `updated by rollout ${id}`,
    failed: (id) => `failed in rollout ${id}`,
    rolling_back: (id) => `rolling back in rollout ${id}`,
    rolled_back: (id) => `rolled back by rollout ${id}`,
    rollback_failed: (id) => `rollback failed in rollout ${id}`,
    skipped: (id) => `skipped by rollout ${id}`,
  };
  const PHASE_LABEL = {
    canary: 'canary', batches: 'batches', rolling_back: 'rolling back', frozen: 'frozen',
    completed: 'completed', rolled_back: 'rolled back', aborted: 'aborted',
  };
  // Finished rollouts the panel keeps showing below the running ones.
  const FINISHED_SHOWN = 3;
  const view = { env: '', service: '', status: '', page: 1, perPage: 60 };
  let services = [];
  let alertsApi = true;
  let rollouts = [];

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
    rollouts = d.rollouts || [];
    fillFilters();
    rolloutPanel(d.rollouts);
    statusChart(c);
    deployChart(d.deploys);
    updateChart(rollouts);
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

  // What a rollout is doing with an instance: the registry's `rollout` mark (the same one
  // `lockstep status` and `verify` show), present while its service's latest rollout runs
  // and, after it ended, on the nodes it failed on or skipped.
  const rolloutOf = (i) => (i.rollout && i.rollout.step ? i.rollout : null);
  function rolloutLabel(ro) {
    const f = STEP_LABEL[ro.step];
    const base = f ? f(ro.id) : `${ro.step} in rollout ${ro.id}`;
    return ro.reason && ro.step !== 'pending' ? `${base}: ${ro.reason}` : base;
  }

  function grid(page) {
    const cells = page.items.map((i) => {
      const ro = rolloutOf(i);
      const label = ro ? rolloutLabel(ro) : '';
      const cell = el('div', {
        class: `cell s-${i.status}` + (ro ? ` ro-${ro.step}` : ''), role: 'listitem',
        'data-instance': i.instance_id, 'data-status': i.status,
        'data-rollout-step': ro ? ro.step : null,
        'aria-label': `${i.instance_id}: ${i.status}, version ${short(i.version_id)}` +
          (i.drift_secs ? `, drifting for ${secs(i.drift_secs)}` : '') + (label ? `, ${label}` : ''),
        title: `${i.env}/${i.service} ${i.instance_id}${i.host ? ' on ' + i.host : ''}` +
          (label ? `\n${label}` : ''),
      },
      el('span', { class: 'id' }, i.instance_id),
      el('span', { class: 'svc' }, `${i.env}/${i.service}`),
      el('span', { class: 'ver mono' }, short(i.version_id)),
      el('span', { class: 'st' }, i.status + (i.drift_secs ? ` · ${secs(i.drift_secs)}` : '')));
      if (ro) cell.append(el('span', { class: 'ro' }, label));
      return cell;
    });
    $('grid').replaceChildren(...cells);
    const pages = Math.max(1, Math.ceil(page.total / page.per_page));
    $('inst-count').textContent = `(${page.total})`;
    $('page-info').textContent = `page ${page.page} of ${pages}`;
    $('prev').disabled = page.page <= 1;
    $('next').disabled = page.page >= pages;
  }

  // ---- rollouts ----
  // Segments of a progress bar, in the order they are drawn.
  const SEGMENTS = [
    ['updated', 'updated'], ['failed', 'failed'], ['rolled_back', 'rolled back'],
    ['skipped', 'skipped'], ['in_progress', 'in progress'], ['pending', 'waiting'],
  ];
  function rolloutPanel(list) {
    const box = $('rollouts');
    if (list === null || list === undefined) {
      $('rollouts-note').textContent = 'Rollouts unavailable: the store did not answer.';
      $('rollouts-count').textContent = '';
      box.replaceChildren();
      return;
    }
    const running = list.filter((r) => r.running || r.needs_person);
    const finished = list.filter((r) => !r.running && !r.needs_person).slice(0, FINISHED_SHOWN);
    const frozen = running.filter((r) => r.needs_person).length;
    const live = running.length - frozen;
    $('rollouts-count').textContent = [live ? `${live} running` : '',
      frozen ? `${frozen} frozen` : ''].filter(Boolean).join(', ').replace(/^(.+)$/, '($1)');
    $('rollouts-note').textContent = list.length ? '' : 'No rollout yet.';
    box.replaceChildren(...running.concat(finished).map(rolloutItem));
  }
  function rolloutItem(r) {
    const c = r.counts;
    const state = r.needs_person ? 'frozen' : r.running ? 'running' : 'finished';
    const item = el('article', {
      class: `rollout ${state}` + (r.outcome ? ` out-${r.outcome}` : ''), role: 'listitem',
      'data-rollout': r.id, 'data-phase': r.phase, 'data-state': state,
      'data-outcome': r.outcome || '', 'data-updated': c.updated, 'data-failed': c.failed,
      'data-total': c.total,
    });
    const phase = PHASE_LABEL[r.phase] || r.phase;
    item.append(el('header', {},
      el('span', { class: 'rid' }, `#${r.id}`),
      el('span', { class: 'target' }, `${r.env}/${r.service} → `,
        el('span', { class: 'mono' }, r.version)),
      el('span', { class: `phase ph-${r.phase}` }, phase),
      el('span', { class: 'when' }, r.running ? `running ${secs(Math.round(r.elapsed_secs))}`
        : r.needs_person ? 'waiting for a person' : r.outcome ? `${r.outcome} · finished` : 'stopped')));
    if (r.needs_person) {
      item.append(el('p', { class: 'person', role: 'alert' },
        `Frozen: release ${r.version} is not rollback-safe and nodes failed. Nothing was ` +
        `rolled back; a person must decide: lockstep rollout retry ${r.id}, or abort ${r.id}.`));
    }
    const bar = el('div', {
      class: 'progress', role: 'progressbar', 'aria-valuemin': '0',
      'aria-valuemax': String(c.total), 'aria-valuenow': String(c.updated),
      'aria-label': `rollout ${r.id}: ${c.updated} of ${c.total} nodes updated, ${c.failed} failed`,
    });
    for (const [k, name] of SEGMENTS) {
      if (!c[k]) continue;
      bar.append(el('span', { class: `seg g-${k}`, 'data-n': c[k],
        title: `${name}: ${c[k]}` }));
    }
    // Widths through the CSSOM: the page's CSP allows no inline style attribute.
    Array.from(bar.children).forEach((s) => {
      s.style.width = `${(100 * Number(s.dataset.n)) / Math.max(1, c.total)}%`;
    });
    item.append(bar);
    item.append(el('p', { class: 'counts' },
      el('strong', {}, `${c.updated}/${c.total} updated`),
      c.failed ? el('span', { class: 'bad' }, ` · ${c.failed} failed`) : '',
      c.rolled_back ? ` · ${c.rolled_back} rolled back` : '',
      c.skipped ? ` · ${c.skipped} skipped` : '',
      r.running && c.pending ? ` · ${c.pending} waiting` : ''));
    const nodes = el('ol', { class: 'nodes', 'aria-label': `nodes of rollout ${r.id}` },
      ...r.nodes.map((n) => el('li', {
        class: `node g-${n.step}`, 'data-node': n.instance_id, 'data-step': n.step,
        title: `${n.instance_id}: ${n.step}${n.reason ? ' — ' + n.reason : ''}`,
      })));
    item.append(nodes);
    const lines = [];
    if (r.working_on.length) lines.push(el('span', { class: 'now' }, `working on ${r.working_on.join(', ')}`));
    if (r.last_change) {
      const l = r.last_change;
      lines.push(el('span', { class: 'last' }, `last: ${l.instance_id} ${l.step.replace('_', ' ')}` +
        (l.reason ? ` (${l.reason})` : '') + ` at ${new Date(l.at).toLocaleTimeString()}`));
    }
    if (lines.length) item.append(el('p', { class: 'activity' }, ...lines));
    if (!r.running) item.append(el('p', { class: 'summary' }, r.summary));
    return item;
  }

  // Successful vs failed vs skipped node updates per recent rollout, oldest on the left;
  // the number above a bar is its success rate.
  function updateChart(list) {
    const fig = $('update-chart');
    if (!list.length) { fig.replaceChildren(el('p', { class: 'note' }, 'no rollouts yet')); return; }
    const rows = list.slice(0, 12).reverse();
    const w = 320, h = 160, top = 16, bw = Math.min(w / rows.length, 48);
    const max = Math.max(1, ...rows.map((r) => r.counts.total));
    const root = svg('svg', { viewBox: `0 0 ${w} ${h + 30}`, class: 'chart' });
    const parts = [['updated', 'successful'], ['failed', 'failed'],
      ['rolled_back', 'rolled back'], ['skipped', 'skipped'],
      ['in_progress', 'in progress'], ['pending', 'waiting']];
    rows.forEach((r, i) => {
      const c = r.counts;
      const x = i * bw + 3;
      const bwid = Math.max(bw - 6, 2);
      const g = svg('g', { class: 'ubar', 'data-rollout': r.id });
      const rate = c.total ? Math.round((100 * c.updated) / c.total) : 0;
      g.append(svg('title', {}, `rollout ${r.id} ${r.env}/${r.service} ${r.version}: ` +
        parts.filter(([k]) => c[k]).map(([k, n]) => `${c[k]} ${n}`).join(', ') +
        (r.running ? ' (running)' : ` — ${r.summary}`)));
      let y = h;
      for (const [k] of parts) {
        if (!c[k]) continue;
        const bh = Math.max(1, ((h - top) * c[k]) / max);
        y -= bh;
        g.append(svg('rect', { x, y, width: bwid, height: bh, class: `g-${k}`, 'data-part': k,
          'data-n': c[k] }));
      }
      g.append(svg('text', { x: x + bwid / 2, y: y - 4, class: 'num' },
        r.running ? '…' : `${rate}%`));
      g.append(svg('text', { x: x + bwid / 2, y: h + 18, class: 'axis' }, `#${r.id}`));
      root.append(g);
    });
    const legend = el('p', { class: 'legend' }, ...parts.slice(0, 4).map(([k, n]) =>
      el('span', { class: `key g-${k}` }, n)));
    fig.replaceChildren(root, legend);
    const done = rows.filter((r) => !r.running);
    const ok = done.reduce((a, r) => a + r.counts.updated, 0);
    const all = done.reduce((a, r) => a + r.counts.total, 0);
    fig.setAttribute('aria-label', `node updates in the last ${rows.length} rollouts: ` +
      rows.map((r) => `rollout ${r.id} ${r.counts.updated} successful, ${r.counts.failed} failed, ` +
        `${r.counts.skipped} skipped`).join('; ') +
      (all ? `; ${Math.round((100 * ok) / all)}% of finished node updates succeeded` : ''));
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
  // While a rollout runs, its elapsed time moves and a node's step can change with no event
  // of its own (a failure is recorded as the step): a quicker poll, only then.
  setInterval(() => { if (rollouts.some((r) => r.running)) schedule(); }, 2000);
})();

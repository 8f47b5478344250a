// One key: every field, editing, disable/enable, rotate, revoke, delete, and its usage.

import {h, replace, field, select, statusBadge, time, confirmDialog} from './dom.js';
import {api} from './api.js';
import {keyFields, showProblem} from './create.js';
import {secretPanel} from './secret.js';
import {usageFigure, totalsOf} from './chart.js';

const RANGES = {
  hour: {label: 'Last hour', span: 3600000, granularity: 'minute', caption: 'Requests per minute, last hour'},
  day: {label: 'Last day', span: 86400000, granularity: 'hour', caption: 'Requests per hour, last 24 hours'},
  month: {label: 'Last month', span: 30 * 86400000, granularity: 'day', caption: 'Requests per day, last 30 days'},
};

const GRACE = [['0s', 'none: the old key stops at once'], ['1h', '1 hour'], ['24h', '24 hours'], ['7d', '7 days'], ['30d', '30 days']];

function limitText(limit, kind) {
  if (!limit) return h('span', {class: 'muted'}, 'from the plan');
  const parts = kind === 'rate'
    ? [`${limit.requests} per ${limit.per}`, limit.burst ? `burst ${limit.burst}` : null]
    : [`${limit.requests} per ${limit.per}`];
  if (limit.by === 'owner') parts.push('shared by the owner\'s keys');
  return parts.filter(Boolean).join(', ');
}

function list(items, empty) {
  if (!items || !items.length) return h('span', {class: 'muted'}, empty);
  return h('ul', {class: 'plain'}, items.map((item) => h('li', {class: 'mono'}, item)));
}

function details(record) {
  const rows = [
    ['Id', h('span', {class: 'mono'}, record.id)],
    ['Key', h('span', {class: 'mono'}, record.masked || '')],
    ['Prefix', h('span', {class: 'mono'}, record.prefix || '')],
    ['Name', record.name],
    ['Owner', record.owner || h('span', {class: 'muted'}, '—')],
    ['Plan', record.plan || h('span', {class: 'muted'}, 'the default plan')],
    ['Status', statusBadge(record.status)],
    ['Scopes', list(record.scopes, 'none')],
    ['IP allowlist', list(record.ip_allowlist, 'any address')],
    ['Rate limit', limitText(record.rate_limit, 'rate')],
    ['Quota', limitText(record.quota, 'quota')],
    ['Expires', record.expires_at ? time(record.expires_at) : h('span', {class: 'muted'}, 'never')],
    ['Tags', (record.tags || []).length ? record.tags.map((t) => h('span', {class: 'chip'}, t)) : h('span', {class: 'muted'}, 'none')],
    ['Metadata', record.metadata && Object.keys(record.metadata).length
      ? h('pre', {class: 'mono'}, JSON.stringify(record.metadata, null, 2)) : h('span', {class: 'muted'}, 'none')],
    ['Created', time(record.created_at)],
    ['Updated', time(record.updated_at)],
    ['Last used', record.last_used_at ? time(record.last_used_at) : h('span', {class: 'muted'}, 'never')],
  ];
  return h('dl', {class: 'record'}, rows.map(([name, value]) => h('div', {}, h('dt', {}, name), h('dd', {}, value))));
}

export function render({main, parts, session, bus, notify, navigate}) {
  const id = parts[1];
  let record = null;
  let alive = true;
  let deleted = false;
  let range = 'hour';
  const liveCounts = {requests: 0, allowed: 0, denied: 0};
  // A `usage` event holds a key's totals so far in one minute, sent again as they grow
  // (and early in the next minute, for usage that arrives late): the live line adds what
  // each event adds to the totals last seen for its minute. The minute in progress when
  // the page opened starts from its totals in the first usage load.
  const openedAt = Date.now();
  const minuteTotals = new Map();

  const heading = h('h1', {}, id);
  const badge = h('span');
  const actions = h('div', {class: 'actions key-actions'});
  const secretBox = h('div');
  const body = h('div', {class: 'detail-body'});
  const edit = h('div');
  const liveLine = h('p', {class: 'live-counts muted'}, 'Live: waiting for usage…');
  const usageBox = h('div', {class: 'usage-box', 'aria-live': 'off'});
  const totalsLine = h('p', {class: 'totals', role: 'status'});
  const rangeRadios = Object.entries(RANGES).map(([value, r]) => {
    const input = h('input', {type: 'radio', name: 'range', value, checked: value === range});
    input.addEventListener('change', () => {
      range = value;
      loadUsage();
    });
    return h('label', {class: 'segment'}, input, ` ${r.label}`);
  });
  const refresh = h('button', {type: 'button', class: 'secondary refresh-usage', onclick: () => loadUsage()}, 'Refresh');

  main.appendChild(h('section', {class: 'key-detail'},
    h('p', {class: 'crumbs'}, h('a', {href: '#/keys'}, '← Keys')),
    h('div', {class: 'title-row'}, heading, badge),
    actions,
    secretBox,
    h('section', {class: 'usage', 'aria-labelledby': 'usage-title'},
      h('div', {class: 'title-row'}, h('h2', {id: 'usage-title'}, 'Usage'),
        h('fieldset', {class: 'segments'}, h('legend', {class: 'visually-hidden'}, 'Period'), rangeRadios), refresh),
      liveLine, totalsLine, usageBox),
    h('section', {'aria-labelledby': 'fields-title'}, h('h2', {id: 'fields-title'}, 'Fields'), body),
    edit,
    h('p', {}, h('a', {href: `#/audit?key_id=${encodeURIComponent(id)}`}, 'Audit trail of this key →'))));

  function show(next) {
    record = next;
    heading.textContent = record.name || record.id;
    replace(badge, statusBadge(record.status));
    replace(body, details(record));
    replace(actions, session.canWrite() && !deleted ? actionButtons() : []);
    // The edit form is rebuilt only when closed, so a change arriving meanwhile does not wipe typing.
    const open = edit.querySelector('details[open]');
    if (!open) replace(edit, session.canWrite() && !deleted && record.status !== 'revoked' ? editForm() : []);
  }

  function actionButtons() {
    const buttons = [];
    if (record.status === 'active') {
      buttons.push(h('button', {type: 'button', class: 'secondary disable-key', onclick: () => setStatus('disabled')}, 'Disable'));
    } else if (record.status === 'disabled') {
      buttons.push(h('button', {type: 'button', class: 'secondary enable-key', onclick: () => setStatus('active')}, 'Enable'));
    }
    if (record.status !== 'revoked') {
      buttons.push(h('button', {type: 'button', class: 'secondary rotate-key', onclick: rotate}, 'Rotate…'));
      buttons.push(h('button', {type: 'button', class: 'danger revoke-key', onclick: revoke}, 'Revoke…'));
    }
    buttons.push(h('button', {type: 'button', class: 'danger delete-key', onclick: remove}, 'Delete…'));
    return buttons;
  }

  function editForm() {
    const fields = keyFields(record);
    const error = h('p', {class: 'error', role: 'alert', hidden: true});
    const save = h('button', {type: 'submit'}, 'Save changes');
    const form = h('form', {class: 'key-form', novalidate: true}, fields.nodes, error, h('div', {class: 'actions'}, save));
    const box = h('details', {class: 'edit'}, h('summary', {}, 'Edit this key'), form);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.hidden = true;
      let patch;
      try {
        patch = fields.read();
      } catch (e) {
        showProblem(error, e);
        return;
      }
      if (!Object.keys(patch).length) {
        showProblem(error, new Error('Nothing has changed.'));
        return;
      }
      save.disabled = true;
      try {
        const updated = await api('PATCH', `/v1/keys/${encodeURIComponent(id)}`, {body: patch});
        box.open = false;
        show(updated);
        notify('Changes saved.', 'success');
      } catch (e) {
        if (e.status !== 401) showProblem(error, e);
      } finally {
        save.disabled = false;
      }
    });
    return box;
  }

  async function act(promise, done) {
    try {
      const result = await promise;
      if (alive) done(result);
    } catch (e) {
      if (alive && e.status !== 401) notify(e.message, 'error');
    }
  }

  function setStatus(status) {
    act(api('PATCH', `/v1/keys/${encodeURIComponent(id)}`, {body: {status}}), (updated) => {
      show(updated);
      notify(status === 'disabled' ? 'Key disabled: its requests get 403 key_disabled.' : 'Key enabled.', 'success');
    });
  }

  async function revoke() {
    const ok = await confirmDialog({
      title: 'Revoke this key?',
      body: [h('p', {}, 'Requests with ', h('code', {}, record.masked || id), ' will be refused with 401 key_revoked, on every gateway, within a second.'),
        h('p', {}, h('strong', {}, 'This cannot be undone.'))],
      confirm: 'Revoke key',
    });
    if (!ok) return;
    act(api('POST', `/v1/keys/${encodeURIComponent(id)}/revoke`), (updated) => {
      show(updated);
      notify('Key revoked.', 'success');
    });
  }

  async function remove() {
    const ok = await confirmDialog({
      title: 'Delete this key?',
      body: [h('p', {}, 'The record of ', h('code', {}, record.masked || id), ' is removed; requests with it get 401 invalid_key.'),
        h('p', {}, 'Its audit trail is kept. ', h('strong', {}, 'This cannot be undone.'))],
      confirm: 'Delete key',
    });
    if (!ok) return;
    act(api('DELETE', `/v1/keys/${encodeURIComponent(id)}`), () => {
      deleted = true;
      notify('Key deleted.', 'success');
      navigate('#/keys');
    });
  }

  function rotate() {
    const grace = select('grace_period', GRACE, '24h');
    const error = h('p', {class: 'error', role: 'alert', hidden: true});
    const go = h('button', {type: 'button'}, 'Rotate key');
    const cancel = h('button', {type: 'button', class: 'secondary', onclick: () => dialog.close()}, 'Cancel');
    const dialog = h('dialog', {'aria-labelledby': 'rotate-title'},
      h('h2', {id: 'rotate-title'}, 'Rotate this key'),
      h('p', {}, 'A new key with the same fields is created. The old one keeps working for the grace period, then expires.'),
      field('Grace period', grace),
      error,
      h('div', {class: 'actions'}, cancel, go));
    dialog.addEventListener('close', () => dialog.remove());
    go.addEventListener('click', async () => {
      go.disabled = true;
      try {
        const rotated = await api('POST', `/v1/keys/${encodeURIComponent(id)}/rotate`, {body: {grace_period: grace.value}});
        dialog.close();
        if (!alive) return;
        replace(secretBox, secretPanel({
          raw: rotated.key,
          record: rotated.record,
          title: 'The new key',
          note: grace.value === '0s' ? 'The old key has stopped working.' : `The old key keeps working for ${grace.value}.`,
        }));
        notify('Key rotated.', 'success');
        secretBox.querySelector('h2').tabIndex = -1;
        secretBox.querySelector('h2').focus();
        load();
      } catch (e) {
        if (e.status === 401) {
          dialog.close();
        } else {
          showProblem(error, e);
        }
      } finally {
        go.disabled = false;
      }
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    grace.focus();
  }

  async function load() {
    try {
      const next = await api('GET', `/v1/keys/${encodeURIComponent(id)}`);
      if (alive) show(next);
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (e.status === 404) {
        deleted = true;
        heading.textContent = 'No such key';
        replace(actions);
        replace(edit);
        replace(body, h('p', {}, `There is no key ${id}: it may have been deleted.`));
      } else {
        notify(e.message, 'error');
      }
    }
  }

  let usageSeq = 0;
  async function loadUsage() {
    const r = RANGES[range];
    const to = new Date();
    const from = new Date(to.getTime() - r.span);
    const seq = ++usageSeq;
    usageBox.setAttribute('aria-busy', 'true');
    try {
      const usage = await api('GET', `/v1/keys/${encodeURIComponent(id)}/usage`,
        {query: {from: from.toISOString(), to: to.toISOString(), granularity: r.granularity}});
      if (!alive || seq !== usageSeq) return;
      if (r.granularity === 'minute') noteOpeningMinute(usage.buckets);
      const totals = totalsOf(usage.buckets);
      totalsLine.textContent = `${r.label}: ${totals.requests} requests, ${totals.allowed} allowed, ${totals.denied} denied.`;
      replace(usageBox, usageFigure({
        buckets: usage.buckets, from, to, granularity: r.granularity, caption: r.caption, width: usageBox.clientWidth,
      }));
    } catch (e) {
      if (alive && seq === usageSeq && e.status !== 401 && e.status !== 404) {
        replace(usageBox, h('p', {class: 'error'}, e.message));
      }
    } finally {
      usageBox.removeAttribute('aria-busy');
    }
  }

  let usageTimer = null;
  let lastUsageLoad = 0;
  function usageSoon() {
    if (usageTimer) return;
    const wait = Math.max(0, 3000 - (Date.now() - lastUsageLoad));
    usageTimer = setTimeout(() => {
      usageTimer = null;
      lastUsageLoad = Date.now();
      loadUsage();
      load();
    }, wait);
  }

  const onKey = ({detail}) => {
    const mine = [detail.key, detail.successor].find((k) => k && k.id === id);
    if (!mine) return;
    if (detail.type === 'key.deleted') {
      deleted = true;
      replace(actions);
      replace(edit);
      notify('This key was deleted.', 'info');
      replace(badge, h('span', {class: 'badge status-deleted'}, 'deleted'));
    } else if (mine.status) {
      show(mine);
    } else {
      load();
    }
  };
  function noteOpeningMinute(buckets) {
    const opening = openedAt - (openedAt % 60000);
    const bucket = (buckets || []).find((b) => Date.parse(b.start) === opening);
    if (bucket && !minuteTotals.has(opening)) minuteTotals.set(opening, totalsOf([bucket]));
  }

  const onUsage = ({detail}) => {
    const entry = (detail.keys || []).find((k) => k.key_id === id);
    const minute = Date.parse(detail.window_start);
    if (!entry || Number.isNaN(minute)) return;
    const now = totalsOf([entry]);
    const before = minuteTotals.get(minute) || {requests: 0, allowed: 0, denied: 0};
    minuteTotals.set(minute, now);
    liveCounts.requests += Math.max(0, now.requests - before.requests);
    liveCounts.allowed += Math.max(0, now.allowed - before.allowed);
    liveCounts.denied += Math.max(0, now.denied - before.denied);
    liveLine.textContent = `Live since this page opened: ${liveCounts.requests} requests, ${liveCounts.allowed} allowed, ${liveCounts.denied} denied.`;
    usageSoon();
  };
  const onStream = ({detail}) => {
    if (detail === 'live') {
      load();
      loadUsage();
    }
  };
  bus.addEventListener('key', onKey);
  bus.addEventListener('usage', onUsage);
  bus.addEventListener('stream', onStream);
  load();
  loadUsage();

  return () => {
    alive = false;
    clearTimeout(usageTimer);
    bus.removeEventListener('key', onKey);
    bus.removeEventListener('usage', onUsage);
    bus.removeEventListener('stream', onStream);
    for (const dialog of document.querySelectorAll('dialog')) dialog.close();
  };
}

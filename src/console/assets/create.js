// Creating a key, and the key fields form that editing a key shares.

import {h, field, select, words, replace} from './dom.js';
import {api} from './api.js';
import {secretPanel} from './secret.js';

// A field the form cannot send as it is: which control, and why.
export class FormProblem extends Error {
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

function pad(n) {
  return String(n).padStart(2, '0');
}

// RFC 3339 → the value of a `datetime-local` input, in the browser's time zone.
function localInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function count(control, label) {
  const text = control.value.trim();
  if (!text) return null;
  if (!/^\d+$/.test(text) || Number(text) < 1) throw new FormProblem(control, `${label} must be a whole number of at least 1.`);
  return Number(text);
}

// The editable fields of a key, filled from `record` (none when creating).
// `read()` answers the API body: every filled field when creating, only the
// fields the user changed when editing (cleared ones as null).
export function keyFields(record) {
  const creating = !record;
  const r = record || {};
  const rl = r.rate_limit || {};
  const quota = r.quota || {};
  const groups = [];
  const group = (name, controls, value) => {
    const entry = {name, dirty: false, value};
    for (const control of controls) {
      control.addEventListener('input', () => { entry.dirty = true; });
      control.addEventListener('change', () => { entry.dirty = true; });
    }
    groups.push(entry);
  };
  const text = (name, value, attrs = {}) => h('input', {type: 'text', name, value: value || '', autocomplete: 'off', ...attrs});
  const area = (name, value, rows = 3) => {
    const el = h('textarea', {name, rows, spellcheck: 'false', class: 'mono'});
    el.value = value || '';
    return el;
  };

  const name = text('name', r.name, {required: true, maxlength: 256});
  group('name', [name], () => {
    const v = name.value.trim();
    if (!v) throw new FormProblem(name, 'A key needs a name.');
    return v;
  });
  const owner = text('owner', r.owner);
  group('owner', [owner], () => owner.value.trim() || null);
  const plan = text('plan', r.plan);
  group('plan', [plan], () => plan.value.trim() || null);
  const scopes = area('scopes', (r.scopes || []).join('\n'));
  group('scopes', [scopes], () => words(scopes.value));
  const allowlist = area('ip_allowlist', (r.ip_allowlist || []).join('\n'));
  group('ip_allowlist', [allowlist], () => words(allowlist.value));

  const rlRequests = h('input', {type: 'number', name: 'rate_limit.requests', min: 1, step: 1, value: rl.requests ?? ''});
  const rlPer = text('rate_limit.per', rl.per || '1s', {class: 'short'});
  const rlBurst = h('input', {type: 'number', name: 'rate_limit.burst', min: 1, step: 1, value: rl.burst ?? ''});
  const rlBy = select('rate_limit.by', [['key', 'each key'], ['owner', 'the owner (shared)']], rl.by || 'key');
  group('rate_limit', [rlRequests, rlPer, rlBurst, rlBy], () => {
    const requests = count(rlRequests, 'Rate limit requests');
    if (requests === null) return null;
    const per = rlPer.value.trim();
    if (!per) throw new FormProblem(rlPer, 'Give the rate limit\'s period, such as 1s or 1m.');
    const limit = {requests, per};
    const burst = count(rlBurst, 'Burst');
    if (burst !== null) limit.burst = burst;
    if (rlBy.value === 'owner') limit.by = 'owner';
    return limit;
  });

  const qRequests = h('input', {type: 'number', name: 'quota.requests', min: 1, step: 1, value: quota.requests ?? ''});
  const qPer = select('quota.per', [['day', 'day'], ['month', 'month']], quota.per || 'month');
  const qBy = select('quota.by', [['key', 'each key'], ['owner', 'the owner (shared)']], quota.by || 'key');
  group('quota', [qRequests, qPer, qBy], () => {
    const requests = count(qRequests, 'Quota requests');
    if (requests === null) return null;
    const q = {requests, per: qPer.value};
    if (qBy.value === 'owner') q.by = 'owner';
    return q;
  });

  const expiryMode = select('expiry', [['never', 'never'], ['at', 'at a date and time'], ['ttl', 'after a duration (ttl)']],
    r.expires_at ? 'at' : 'never');
  const expiresAt = h('input', {type: 'datetime-local', name: 'expires_at', value: localInput(r.expires_at)});
  const ttl = text('ttl', '', {placeholder: '30d', class: 'short'});
  const expiryFields = [field('Expires at (your time zone)', expiresAt), field('Time to live', ttl, 'e.g. 90d, 12h')];
  const showExpiry = () => {
    expiryFields[0].hidden = expiryMode.value !== 'at';
    expiryFields[1].hidden = expiryMode.value !== 'ttl';
  };
  expiryMode.addEventListener('change', showExpiry);
  showExpiry();
  const expiry = {name: 'expiry', dirty: false};
  for (const control of [expiryMode, expiresAt, ttl]) {
    control.addEventListener('input', () => { expiry.dirty = true; });
    control.addEventListener('change', () => { expiry.dirty = true; });
  }

  const metadata = area('metadata', r.metadata && Object.keys(r.metadata).length ? JSON.stringify(r.metadata, null, 2) : '', 4);
  group('metadata', [metadata], () => {
    const v = metadata.value.trim();
    if (!v) return {};
    let parsed;
    try {
      parsed = JSON.parse(v);
    } catch (e) {
      throw new FormProblem(metadata, `Metadata is not valid JSON: ${e.message}`);
    }
    if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new FormProblem(metadata, 'Metadata must be a JSON object, such as {"team": "billing"}.');
    }
    return parsed;
  });
  const tags = text('tags', (r.tags || []).join(', '));
  group('tags', [tags], () => words(tags.value));
  const prefix = creating ? text('prefix', '', {placeholder: 'kg_live', class: 'short'}) : null;

  const nodes = [
    h('fieldset', {}, h('legend', {}, 'Key'),
      field('Name', name, creating ? 'Required. Shown in lists and the audit trail.' : null),
      field('Owner', owner, 'A customer or team id. Limits with "by owner" are shared by its keys.'),
      field('Plan', plan, 'A plan from the config; empty for the default plan.'),
      creating ? field('Prefix', prefix, 'Letters, digits and _; the default is kg_live.') : null,
      field('Tags', tags, 'Separated by commas or spaces.')),
    h('fieldset', {}, h('legend', {}, 'Access'),
      field('Scopes', scopes, 'One per line or separated by commas, e.g. orders:read, orders:*'),
      field('IP allowlist', allowlist, 'Addresses or CIDRs, one per line; empty allows any address.')),
    h('fieldset', {class: 'inline'}, h('legend', {}, 'Rate limit'),
      field('Requests', rlRequests, 'Empty: the plan\'s limit.'),
      field('Per', rlPer, 'e.g. 1s, 1m'),
      field('Burst', rlBurst, 'Optional.'),
      field('Counted for', rlBy)),
    h('fieldset', {class: 'inline'}, h('legend', {}, 'Quota'),
      field('Requests', qRequests, 'Empty: the plan\'s quota.'),
      field('Per', qPer),
      field('Counted for', qBy)),
    h('fieldset', {class: 'inline'}, h('legend', {}, 'Expiry'),
      field('Expires', expiryMode), expiryFields),
    h('fieldset', {}, h('legend', {}, 'Metadata'),
      field('Metadata (JSON object)', metadata, 'Free-form, for your own records, e.g. {"team": "billing"}.')),
  ];

  function readExpiry(body) {
    if (expiryMode.value === 'at') {
      if (!expiresAt.value) throw new FormProblem(expiresAt, 'Choose when the key expires.');
      const at = new Date(expiresAt.value);
      if (Number.isNaN(at.getTime())) throw new FormProblem(expiresAt, 'That is not a valid date and time.');
      body.expires_at = at.toISOString();
    } else if (expiryMode.value === 'ttl') {
      const v = ttl.value.trim();
      if (!v) throw new FormProblem(ttl, 'Give a duration, such as 30d.');
      body.ttl = v;
    } else if (!creating) {
      body.expires_at = null;
    }
  }

  function read() {
    const body = {};
    for (const g of groups) {
      if (creating || g.dirty) body[g.name] = g.value();
    }
    if (creating || expiry.dirty) readExpiry(body);
    if (creating) {
      for (const [k, v] of Object.entries(body)) {
        const empty = v === null || (Array.isArray(v) && !v.length) || (typeof v === 'object' && v && !Array.isArray(v) && !Object.keys(v).length);
        if (empty) delete body[k];
      }
      if (prefix.value.trim()) body.prefix = prefix.value.trim();
    }
    return body;
  }

  return {nodes, read};
}

// Shows a problem next to the form and moves focus to the control at fault.
export function showProblem(errorBox, e) {
  errorBox.textContent = e.message;
  errorBox.hidden = false;
  if (e instanceof FormProblem && e.control) e.control.focus();
}

export function render({main, session, notify}) {
  if (!session.canWrite()) {
    main.appendChild(h('section', {}, h('h1', {}, 'Create a key'),
      h('p', {}, 'Your token is read-only: it cannot create keys.')));
    return null;
  }
  const section = h('section', {class: 'create'});
  main.appendChild(section);
  let alive = true;

  function showForm() {
    const fields = keyFields(null);
    const error = h('p', {class: 'error', role: 'alert', hidden: true});
    const submit = h('button', {type: 'submit'}, 'Create key');
    const form = h('form', {class: 'key-form', 'aria-labelledby': 'create-title', novalidate: true},
      fields.nodes, error, h('div', {class: 'actions'}, submit, h('a', {href: '#/keys', class: 'button secondary'}, 'Cancel')));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.hidden = true;
      let body;
      try {
        body = fields.read();
      } catch (e) {
        showProblem(error, e);
        return;
      }
      submit.disabled = true;
      try {
        const created = await api('POST', '/v1/keys', {body});
        if (!alive) return;
        showKey(created);
      } catch (e) {
        if (e.status !== 401) showProblem(error, e);
      } finally {
        submit.disabled = false;
      }
    });
    replace(section, h('h1', {id: 'create-title'}, 'Create a key'), form);
    form.querySelector('input').focus();
  }

  function showKey(created) {
    notify(`Key ${created.record.name} created.`, 'success');
    replace(section,
      h('h1', {}, 'Key created'),
      secretPanel({raw: created.key, record: created.record, title: 'Your new key'}),
      h('div', {class: 'actions'},
        h('a', {href: `#/keys/${encodeURIComponent(created.record.id)}`, class: 'button'}, 'Open the key'),
        h('button', {type: 'button', class: 'secondary', onclick: showForm}, 'Create another')));
    section.querySelector('h1').tabIndex = -1;
    section.querySelector('h1').focus();
  }

  showForm();
  return () => {
    alive = false;
  };
}

// The keys list: search, filters, sorting and cursor pagination (the API never
// counts all keys, so this stays fast with millions). Key events update rows in
// place and refresh the page shown.

import {h, replace, field, select, statusBadge, time} from './dom.js';
import {api} from './api.js';

const FILTERS = ['q', 'owner', 'status', 'plan', 'tag', 'sort', 'limit'];

export function keyRow(record) {
  return h('tr', {dataset: {keyId: record.id}},
    h('td', {}, h('a', {href: `#/keys/${encodeURIComponent(record.id)}`, class: 'mono key-link'}, record.masked || record.id)),
    h('td', {dataset: {field: 'name'}}, record.name || ''),
    h('td', {}, record.owner || h('span', {class: 'muted'}, '—')),
    h('td', {}, record.plan || h('span', {class: 'muted'}, 'default')),
    h('td', {dataset: {field: 'status'}}, statusBadge(record.status)),
    h('td', {}, (record.tags || []).map((tag) => h('span', {class: 'chip'}, tag))),
    h('td', {}, time(record.created_at)),
    h('td', {}, record.last_used_at ? time(record.last_used_at) : h('span', {class: 'muted'}, 'never')));
}

export function render({main, query, session, bus, notify, setQuery}) {
  const values = Object.fromEntries(FILTERS.map((name) => [name, query.get(name) || '']));
  const input = (name, attrs = {}) => h('input', {type: 'text', name, value: values[name], autocomplete: 'off', ...attrs});
  const form = h('form', {class: 'filters', role: 'search', 'aria-label': 'Find keys'},
    field('Search', input('q', {type: 'search', placeholder: 'name, owner, id or key'})),
    field('Owner', input('owner')),
    field('Status', select('status', [['', 'any'], ['active', 'active'], ['disabled', 'disabled'], ['revoked', 'revoked']], values.status)),
    field('Plan', input('plan')),
    field('Tag', input('tag')),
    field('Sort by', select('sort', [['', 'newest first'], ['last_used', 'last used']], values.sort === 'created' ? '' : values.sort)),
    field('Per page', select('limit', [['25', '25'], ['', '50'], ['100', '100']], values.limit)),
    h('div', {class: 'field actions'}, h('button', {type: 'submit'}, 'Search'),
      h('button', {type: 'reset', class: 'secondary'}, 'Clear')));

  const tbody = h('tbody');
  const table = h('table', {class: 'keys-table', 'aria-describedby': 'keys-status'},
    h('thead', {}, h('tr', {}, ['Key', 'Name', 'Owner', 'Plan', 'Status', 'Tags', 'Created', 'Last used']
      .map((title) => h('th', {scope: 'col'}, title)))),
    tbody);
  const status = h('p', {id: 'keys-status', class: 'muted', role: 'status'});
  const previous = h('button', {type: 'button', class: 'secondary', disabled: true}, '← Previous');
  const next = h('button', {type: 'button', class: 'secondary', disabled: true}, 'Next →');
  const pageLabel = h('span', {class: 'page-label'});

  main.appendChild(h('section', {class: 'keys'},
    h('div', {class: 'title-row'}, h('h1', {}, 'Keys'),
      session.canWrite() ? h('a', {href: '#/create', class: 'button create-key'}, 'Create key') : null),
    form,
    h('div', {class: 'table-wrap'}, table),
    h('nav', {class: 'pager', 'aria-label': 'Pages'}, previous, pageLabel, next),
    status));

  // Cursors of the pages before this one, for "previous"; '' is the first page.
  let stack = [];
  let cursor = '';
  let nextCursor = null;
  let loading = false;
  let again = false;
  let alive = true;
  let refreshTimer = null;

  async function load() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    table.setAttribute('aria-busy', 'true');
    try {
      const result = await api('GET', '/v1/keys', {query: {...values, cursor}});
      if (!alive) return;
      nextCursor = result.next_cursor || null;
      const records = result.keys || [];
      replace(tbody, records.length ? records.map(keyRow)
        : h('tr', {}, h('td', {colspan: 8, class: 'empty'}, cursor ? 'No more keys.' : 'No keys match.')));
      previous.disabled = stack.length === 0;
      next.disabled = !nextCursor;
      pageLabel.textContent = `Page ${stack.length + 1}`;
      status.textContent = `${records.length} key${records.length === 1 ? '' : 's'} on this page${nextCursor ? ', more on the next' : ''}.`;
    } catch (e) {
      if (alive && e.status !== 401) notify(e.message, 'error');
    } finally {
      loading = false;
      table.removeAttribute('aria-busy');
      if (again && alive) {
        again = false;
        load();
      }
    }
  }

  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(load, 250);
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    for (const name of FILTERS) values[name] = String(data.get(name) || '').trim();
    setQuery(values);
    stack = [];
    cursor = '';
    load();
  });
  form.addEventListener('reset', (event) => {
    event.preventDefault();
    for (const name of FILTERS) values[name] = '';
    for (const el of form.elements) if (el.name) el.value = '';
    setQuery(values);
    stack = [];
    cursor = '';
    load();
  });
  next.addEventListener('click', () => {
    if (!nextCursor) return;
    stack.push(cursor);
    cursor = nextCursor;
    load();
  });
  previous.addEventListener('click', () => {
    if (!stack.length) return;
    cursor = stack.pop();
    load();
  });

  const onKey = ({detail}) => {
    for (const record of [detail.key, detail.successor]) {
      if (!record || !record.id) continue;
      const row = [...tbody.rows].find((r) => r.dataset.keyId === record.id);
      if (!row) continue;
      if (detail.type === 'key.deleted') {
        row.remove();
      } else if (record.status) {
        const fresh = keyRow(record);
        fresh.classList.add('changed');
        row.replaceWith(fresh);
      }
    }
    if (detail.type !== 'key.expiring' && detail.type !== 'quota.threshold') refreshSoon();
  };
  const onStream = ({detail}) => {
    if (detail === 'live') refreshSoon();
  };
  bus.addEventListener('key', onKey);
  bus.addEventListener('stream', onStream);
  load();

  return () => {
    alive = false;
    clearTimeout(refreshTimer);
    bus.removeEventListener('key', onKey);
    bus.removeEventListener('stream', onStream);
  };
}

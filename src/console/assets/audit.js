// The audit trail: who changed what, filtered by key and by actor (token name).

import {h, replace, field, select, time} from './dom.js';
import {api} from './api.js';

export function render({main, query, bus, notify, setQuery}) {
  const values = {key_id: query.get('key_id') || '', actor: query.get('actor') || '', limit: query.get('limit') || ''};
  const keyId = h('input', {type: 'text', name: 'key_id', value: values.key_id, class: 'mono', autocomplete: 'off', placeholder: 'key_…'});
  const actor = h('input', {type: 'text', name: 'actor', value: values.actor, autocomplete: 'off', placeholder: 'token name'});
  const limit = select('limit', [['', '100'], ['500', '500'], ['1000', '1000']], values.limit);
  const form = h('form', {class: 'filters', role: 'search', 'aria-label': 'Filter the audit trail'},
    field('Key id', keyId), field('Actor', actor), field('Events', limit),
    h('div', {class: 'field actions'}, h('button', {type: 'submit'}, 'Filter')));
  const tbody = h('tbody');
  const status = h('p', {class: 'muted', role: 'status'});
  main.appendChild(h('section', {class: 'audit'},
    h('h1', {}, 'Audit trail'),
    form,
    h('div', {class: 'table-wrap'}, h('table', {class: 'audit-table'},
      h('thead', {}, h('tr', {}, ['When', 'Actor', 'Action', 'Key', 'Details'].map((t) => h('th', {scope: 'col'}, t)))),
      tbody)),
    status));

  let alive = true;
  let timer = null;
  async function load() {
    try {
      const result = await api('GET', '/v1/audit', {query: values});
      if (!alive) return;
      const events = result.events || [];
      replace(tbody, events.length ? events.map((e) => h('tr', {},
        h('td', {}, time(e.at)),
        h('td', {}, e.actor || ''),
        h('td', {}, h('code', {}, e.action || '')),
        h('td', {}, e.key_id ? h('a', {href: `#/keys/${encodeURIComponent(e.key_id)}`, class: 'mono'}, e.key_id) : ''),
        h('td', {}, e.details && (typeof e.details !== 'object' || Object.keys(e.details).length)
          ? h('code', {class: 'details'}, JSON.stringify(e.details)) : '')))
        : h('tr', {}, h('td', {colspan: 5, class: 'empty'}, 'No events match.')));
      status.textContent = `${events.length} event${events.length === 1 ? '' : 's'}, newest first.`;
    } catch (e) {
      if (alive && e.status !== 401) notify(e.message, 'error');
    }
  }
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    values.key_id = keyId.value.trim();
    values.actor = actor.value.trim();
    values.limit = limit.value;
    setQuery(values);
    load();
  });
  const onKey = ({detail}) => {
    if (detail.type === 'key.expiring' || detail.type === 'quota.threshold') return;
    clearTimeout(timer);
    timer = setTimeout(load, 300);
  };
  bus.addEventListener('key', onKey);
  load();
  return () => {
    alive = false;
    clearTimeout(timer);
    bus.removeEventListener('key', onKey);
  };
}

// The gateways following this node: index version, lag and last contact,
// refreshed every few seconds and on key events.

import {h, replace, time, ago} from './dom.js';
import {api} from './api.js';

const EVERY = 5000;

export function render({main, bus}) {
  const summary = h('p', {class: 'fleet-summary', role: 'status'});
  const tbody = h('tbody');
  const table = h('table', {class: 'fleet-table'},
    h('thead', {}, h('tr', {}, ['Node', 'Index version', 'Lag', 'Last contact', 'Connected', 'Address']
      .map((t) => h('th', {scope: 'col'}, t)))),
    tbody);
  main.appendChild(h('section', {class: 'fleet'},
    h('h1', {}, 'Fleet'),
    h('p', {class: 'muted'}, 'Gateways that follow this node\'s key feed. Lag is how many changes a gateway has yet to apply.'),
    summary,
    h('div', {class: 'table-wrap'}, table)));
  const wrap = table.parentNode;

  let alive = true;
  let timer = null;
  let soon = null;
  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    clearTimeout(timer);
    try {
      const result = await api('GET', '/v1/gateways');
      if (!alive) return;
      const gateways = result.gateways || [];
      const version = result.version;
      wrap.hidden = false;
      summary.textContent = `${gateways.length} gateway${gateways.length === 1 ? '' : 's'}`
        + (version !== undefined && version !== null ? ` · index version here: ${version}` : '')
        + ` · updated ${new Date().toLocaleTimeString()}`;
      replace(tbody, gateways.length ? gateways.map((g) => h('tr', {dataset: {node: g.node_id}},
        h('th', {scope: 'row', class: 'mono'}, g.node_id || ''),
        h('td', {}, String(g.version ?? '—')),
        h('td', {class: Number(g.lag) > 0 ? 'lagging' : ''}, String(g.lag ?? '—')),
        h('td', {}, g.last_seen ? [time(g.last_seen), h('span', {class: 'muted'}, ` (${ago(g.last_seen)})`)] : '—'),
        h('td', {}, h('span', {class: `badge ${g.connected ? 'status-active' : 'status-disabled'}`}, g.connected ? 'yes' : 'no')),
        h('td', {class: 'mono'}, g.address || '—')))
        : h('tr', {}, h('td', {colspan: 6, class: 'empty'}, 'No gateway follows this node.')));
    } catch (e) {
      if (!alive) return;
      if (e.status === 404) {
        summary.textContent = 'This node does not report its gateways.';
        wrap.hidden = true;
      } else if (e.status !== 401) {
        summary.textContent = `Cannot load the fleet: ${e.message}`;
      }
    } finally {
      loading = false;
      if (alive) timer = setTimeout(load, EVERY);
    }
  }
  const onEvent = () => {
    clearTimeout(soon);
    soon = setTimeout(load, 500);
  };
  bus.addEventListener('key', onEvent);
  bus.addEventListener('stream', onEvent);
  load();
  return () => {
    alive = false;
    clearTimeout(timer);
    clearTimeout(soon);
    bus.removeEventListener('key', onEvent);
    bus.removeEventListener('stream', onEvent);
  };
}

// A raw key, shown once: after a create or a rotation. It lives only in this
// panel's DOM; leaving the page drops it, and the API never returns it again.

import {h, field} from './dom.js';

const GATEWAY_KEY = 'keygate.gateway_url';

// Where the curl example sends its request. Not a secret: kept across sessions.
function gatewayUrl() {
  return localStorage.getItem(GATEWAY_KEY) || `${location.protocol}//${location.hostname}:8080`;
}

function curl(base, raw) {
  const url = `${base.replace(/\/+$/, '')}/`;
  return `curl -H "Authorization: Bearer ${raw}" ${url}`;
}

// Copies `text`, or selects it in `fallback` so the user can copy it by hand.
async function copy(text, fallback, status) {
  try {
    if (!navigator.clipboard) throw new Error('no clipboard');
    await navigator.clipboard.writeText(text);
    status.textContent = 'Copied.';
  } catch {
    fallback.focus();
    fallback.select();
    status.textContent = 'Copying is not allowed here: the text is selected, press Ctrl+C (⌘C) to copy it.';
  }
}

export function secretPanel({raw, record, title, note}) {
  const keyField = h('input', {type: 'text', readonly: true, value: raw, class: 'secret mono', spellcheck: 'false', autocomplete: 'off'});
  const keyStatus = h('span', {class: 'copy-status', role: 'status', 'aria-live': 'polite'});
  const gateway = h('input', {type: 'url', value: gatewayUrl(), class: 'mono', autocomplete: 'off'});
  const example = h('textarea', {readonly: true, rows: 2, class: 'mono curl', spellcheck: 'false'});
  example.value = curl(gateway.value, raw);
  gateway.addEventListener('input', () => {
    example.value = curl(gateway.value, raw);
    localStorage.setItem(GATEWAY_KEY, gateway.value);
  });
  const curlStatus = h('span', {class: 'copy-status', role: 'status', 'aria-live': 'polite'});
  return h('section', {class: 'secret-panel', 'aria-labelledby': 'secret-title'},
    h('h2', {id: 'secret-title'}, title),
    h('p', {class: 'warning', role: 'alert'},
      h('strong', {}, 'Copy this key now: it will not be shown again. '),
      'keygate keeps only its hash.', note ? ` ${note}` : ''),
    field('Key', keyField),
    h('div', {class: 'actions'},
      h('button', {type: 'button', class: 'copy-key', onclick: () => copy(raw, keyField, keyStatus)}, 'Copy key'),
      keyStatus),
    field('Gateway URL', gateway, 'Where your clients send requests (for the example below).'),
    field('Try it', example),
    h('div', {class: 'actions'},
      h('button', {type: 'button', class: 'secondary', onclick: () => copy(example.value, example, curlStatus)}, 'Copy curl command'),
      curlStatus),
    h('p', {}, 'Key id ', h('a', {href: `#/keys/${encodeURIComponent(record.id)}`, class: 'mono'}, record.id),
      ' · shown in lists as ', h('code', {}, record.masked || '')));
}

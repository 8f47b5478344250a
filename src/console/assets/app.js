// The keygate console: a client of the public admin API and nothing else.
// Hash routes: #/keys, #/keys/<id>, #/create, #/audit, #/fleet.

import {token, clearToken, onUnauthorized, whoami} from './api.js';
import {EventStream} from './sse.js';
import {h, clear, append} from './dom.js';
import * as signin from './signin.js';
import * as keys from './keys.js';
import * as create from './create.js';
import * as key from './key.js';
import * as audit from './audit.js';
import * as fleet from './fleet.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const live = document.getElementById('live');
const who = document.getElementById('who');
const signoutButton = document.getElementById('signout');
const notice = document.getElementById('notice');

const session = {
  signedIn: false,
  name: null,
  role: 'admin',
  canWrite() {
    return this.role === 'admin';
  },
};

// Key changes, usage ticks and the stream's state, for the open view:
// 'key' ({type, key, successor}), 'usage' ({window_start, keys}), 'stream' ('live', ...).
const bus = new EventTarget();
let stream = null;
let cleanup = null;
let noticeTimer = null;
let noticeAt = 0;

// Shows a message in the page's live region; 'success' and 'info' fade after a while.
function notify(message, kind = 'info') {
  clearTimeout(noticeTimer);
  clear(notice);
  if (!message) return;
  noticeAt = Date.now();
  const dismiss = h('button', {type: 'button', class: 'link', 'aria-label': 'Dismiss', onclick: () => notify(null)}, '×');
  append(notice, [h('p', {class: `notice-${kind}`}, h('span', {}, message), dismiss)]);
  if (kind !== 'error') noticeTimer = setTimeout(() => notify(null), 8000);
}

function setLive(state) {
  live.dataset.state = state;
  live.textContent = {live: 'live', connecting: 'connecting…', offline: 'offline'}[state] || state;
  bus.dispatchEvent(new CustomEvent('stream', {detail: state}));
}

const KEY_EVENTS = new Set(['key.created', 'key.updated', 'key.disabled', 'key.revoked', 'key.rotated', 'key.deleted',
  'key.expiring', 'quota.threshold']);

function onStreamEvent({event, data}) {
  const type = (data && data.type) || event;
  const body = (data && data.data) || {};
  if (KEY_EVENTS.has(type)) {
    bus.dispatchEvent(new CustomEvent('key', {detail: {type, key: body.key || null, successor: body.successor || null}}));
  } else if (type === 'usage') {
    bus.dispatchEvent(new CustomEvent('usage', {detail: body}));
  }
}

function startStream() {
  if (stream) stream.stop();
  stream = new EventStream({
    url: '/v1/events',
    token,
    onEvent: onStreamEvent,
    onState: setLive,
    onUnauthorized: () => signOut('The token is no longer valid: sign in again.'),
  });
  stream.start();
}

function signedIn(me) {
  session.signedIn = true;
  session.name = me.name;
  session.role = me.role;
  document.body.dataset.role = me.role;
  who.textContent = me.name ? `${me.name} (${me.role})` : me.role;
  nav.hidden = false;
  live.hidden = false;
  signoutButton.hidden = false;
  for (const link of nav.querySelectorAll('[data-write]')) link.hidden = !session.canWrite();
  startStream();
  if (!location.hash || location.hash === '#/' || location.hash.startsWith('#/signin')) {
    location.hash = '#/keys';
  } else {
    route();
  }
}

function signOut(message) {
  clearToken();
  if (stream) stream.stop();
  stream = null;
  session.signedIn = false;
  session.name = null;
  session.role = 'admin';
  delete document.body.dataset.role;
  who.textContent = '';
  nav.hidden = true;
  live.hidden = true;
  signoutButton.hidden = true;
  setLive('offline');
  notify(message || null, message ? 'error' : 'info');
  route();
}

function parseHash() {
  const text = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = text.split('?');
  return {parts: path.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query)};
}

// Changes the hash without rendering again (for filters kept in the URL).
function setQuery(params) {
  const {parts} = parseHash();
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) if (value) query.set(name, value);
  const text = query.toString();
  history.replaceState(null, '', `#/${parts.map(encodeURIComponent).join('/')}${text ? `?${text}` : ''}`);
}

function navigate(hash) {
  location.hash = hash;
}

function route(focus = false) {
  if (cleanup) cleanup();
  cleanup = null;
  clear(main);
  const {parts, query} = parseHash();
  if (!session.signedIn) {
    signin.render({main, signedIn});
    return;
  }
  const ctx = {main, parts, query, session, bus, notify, navigate, setQuery};
  const page = parts[0] || 'keys';
  for (const link of nav.querySelectorAll('a')) {
    if (link.dataset.route === page) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  let view;
  if (page === 'keys' && parts.length === 1) view = keys;
  else if (page === 'keys' && parts.length === 2) view = key;
  else if (page === 'create' && parts.length === 1) view = create;
  else if (page === 'audit' && parts.length === 1) view = audit;
  else if (page === 'fleet' && parts.length === 1) view = fleet;
  if (!view) {
    main.appendChild(h('section', {}, h('h1', {}, 'Not found'),
      h('p', {}, 'This page does not exist. ', h('a', {href: '#/keys'}, 'Go to the keys.'))));
    return;
  }
  cleanup = view.render(ctx) || null;
  if (focus) {
    const heading = main.querySelector('h1');
    if (heading) {
      heading.tabIndex = -1;
      heading.focus({preventScroll: false});
    }
  }
}

async function boot() {
  // A fault in the console itself is shown, not only logged.
  window.addEventListener('error', (e) => notify(`The console failed: ${e.message}`, 'error'));
  window.addEventListener('unhandledrejection', (e) => notify(`The console failed: ${e.reason && e.reason.message ? e.reason.message : e.reason}`, 'error'));
  onUnauthorized(() => {
    if (session.signedIn) signOut('The token is no longer valid: sign in again.');
  });
  signoutButton.addEventListener('click', () => signOut());
  window.addEventListener('hashchange', () => {
    // A notice given just before navigating is about the page navigated to.
    if (Date.now() - noticeAt > 1000) notify(null);
    route(true);
  });
  setLive('offline');
  if (!token()) {
    route();
    return;
  }
  try {
    signedIn(await whoami());
  } catch (e) {
    if (e.status !== 401) {
      clearToken();
      notify(`Cannot check the saved token: ${e.message}`, 'error');
    }
    route();
  }
}

boot();

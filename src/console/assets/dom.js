// Building the page. Every string from the API enters the DOM as a text node or an
// attribute value, never as markup, so nothing it holds can run.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (name === 'value' && 'value' in el) {
      el.value = value;
    } else if (name === 'checked' || name === 'selected') {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name === 'className' ? 'class' : name, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

// Appends strings (as text), nodes and nested arrays; skips null, undefined and false.
export function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
  return el;
}

// `h('button', {type: 'button', onclick: f}, 'Save')`
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

// The same for SVG elements.
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

// "2026-03-01 14:05:09" in the browser's time zone, with the exact UTC time as a tooltip.
export function time(iso) {
  if (!iso) return h('span', {class: 'muted'}, '—');
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h('span', {}, iso);
  return h('time', {datetime: iso, title: iso}, formatTime(d));
}

export function formatTime(d) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// "12 s ago", "3 min ago", ...
export function ago(iso, now = Date.now()) {
  if (!iso) return 'never';
  const seconds = Math.max(0, Math.round((now - new Date(iso).getTime()) / 1000));
  if (Number.isNaN(seconds)) return String(iso);
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function statusBadge(status) {
  return h('span', {class: `badge status-${status}`, dataset: {status}}, status);
}

// A labelled form control: `<div class="field"><label for=id>…</label>control<small>hint</small></div>`.
let fieldSeq = 0;
export function field(label, control, hint) {
  if (!control.id) control.id = `f${++fieldSeq}`;
  const parts = [h('label', {for: control.id}, label), control];
  if (hint) {
    const hintId = `${control.id}-hint`;
    control.setAttribute('aria-describedby', hintId);
    parts.push(h('small', {id: hintId, class: 'hint'}, hint));
  }
  return h('div', {class: 'field'}, parts);
}

export function select(name, options, value) {
  return h('select', {name},
    options.map(([v, label]) => h('option', {value: v, selected: v === value}, label)));
}

// Splits "a, b c\nd" into ["a", "b", "c", "d"] (for scopes, CIDRs and tags).
export function words(text) {
  return String(text || '').split(/[\s,]+/).map((w) => w.trim()).filter(Boolean);
}

// A `<dialog>` asking to confirm; resolves true when confirmed. Escape cancels.
export function confirmDialog({title, body, confirm, danger = true}) {
  return new Promise((resolve) => {
    let confirmed = false;
    const ok = h('button', {type: 'button', class: danger ? 'danger' : '', onclick: () => { confirmed = true; dialog.close(); }}, confirm);
    const cancel = h('button', {type: 'button', class: 'secondary', onclick: () => dialog.close()}, 'Cancel');
    const titleId = `d${++fieldSeq}`;
    const dialog = h('dialog', {'aria-labelledby': titleId, class: 'confirm'},
      h('h2', {id: titleId}, title),
      Array.isArray(body) ? body : h('p', {}, body),
      h('div', {class: 'actions'}, cancel, ok));
    dialog.addEventListener('close', () => { dialog.remove(); resolve(confirmed); });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

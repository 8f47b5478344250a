// Usage charts: stacked bars drawn as inline SVG, with the same numbers as a table.

import {h, s, formatTime} from './dom.js';

// Drawn at about the width it is shown at, so its text stays readable on a phone.
const MIN_WIDTH = 320;
const MAX_WIDTH = 960;
const HEIGHT = 220;
const MARGIN = {top: 10, right: 8, bottom: 24, left: 48};

const ALLOWED = '#15803d';
const DENIED = ['#dc2626', '#ea580c', '#a21caf', '#be123c', '#b45309', '#7c2d12', '#6d28d9', '#9f1239'];
const CLASSES = [['2xx', '#15803d'], ['3xx', '#2563eb'], ['4xx', '#d97706'], ['5xx', '#dc2626']];

export const WIDTHS = {minute: 60000, hour: 3600000, day: 86400000};

// Every bucket from `from` to `to` (UTC-aligned, as the store cuts them), the
// API's buckets in their places and empty ones elsewhere.
export function timeline(buckets, from, to, granularity) {
  const width = WIDTHS[granularity];
  const byStart = new Map();
  for (const bucket of buckets || []) byStart.set(Math.floor(new Date(bucket.start).getTime() / width) * width, bucket);
  const out = [];
  for (let t = Math.floor(from.getTime() / width) * width; t < to.getTime(); t += width) {
    out.push({start: new Date(t), bucket: byStart.get(t) || null});
  }
  return out;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * magnitude) return step * magnitude;
  }
  return 10 * magnitude;
}

function label(date, granularity) {
  const text = formatTime(date);
  if (granularity === 'day') return text.slice(5, 10);
  return text.slice(11, 16);
}

function total(object) {
  return Object.values(object || {}).reduce((a, b) => a + b, 0);
}

// One stacked bar chart. `series(bucket)` lists `[name, value, colour]` per bucket.
function bars({slots, granularity, title, series, describe, width}) {
  const plotWidth = width - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const stacks = slots.map((slot) => (slot.bucket ? series(slot.bucket).filter(([, v]) => v > 0) : []));
  const max = niceMax(Math.max(0, ...stacks.map((stack) => stack.reduce((a, [, v]) => a + v, 0))));
  const step = plotWidth / Math.max(1, slots.length);
  const barWidth = Math.max(1, step * 0.8);
  const y = (value) => MARGIN.top + plotHeight - (value / max) * plotHeight;

  const grid = [0, max / 2, max].map((value) => s('g', {class: 'tick'},
    s('line', {x1: MARGIN.left, x2: width - MARGIN.right, y1: y(value), y2: y(value)}),
    s('text', {x: MARGIN.left - 6, y: y(value) + 4, 'text-anchor': 'end'}, formatCount(value))));
  const every = Math.max(1, Math.ceil(slots.length / Math.max(2, Math.floor(plotWidth / 110))));
  const xLabels = slots.map((slot, i) => (i % every === 0
    ? s('text', {class: 'x-label', x: MARGIN.left + i * step + step / 2, y: HEIGHT - 6, 'text-anchor': 'middle'},
      label(slot.start, granularity))
    : null));
  const groups = slots.map((slot, i) => {
    if (!stacks[i].length) return null;
    let base = 0;
    const x = MARGIN.left + i * step + (step - barWidth) / 2;
    const rects = stacks[i].map(([name, value, colour]) => {
      const rect = s('rect', {
        class: 'bar', x, y: y(base + value), width: barWidth, height: Math.max(0.5, y(base) - y(base + value)),
        fill: colour, dataset: {series: name, value: String(value)},
      });
      base += value;
      return rect;
    });
    return s('g', {class: 'bucket'}, s('title', {}, `${formatTime(slot.start)}: ${describe(slot.bucket)}`), rects);
  });
  return s('svg', {
    class: 'chart-svg', viewBox: `0 0 ${width} ${HEIGHT}`, role: 'img', 'aria-label': title,
  }, grid, xLabels, groups);
}

function formatCount(n) {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(Math.round(n * 10) / 10);
}

function legend(items) {
  return h('ul', {class: 'legend'}, items.map(([name, colour]) => h('li', {},
    s('svg', {width: 12, height: 12, 'aria-hidden': 'true'}, s('rect', {width: 12, height: 12, rx: 2, fill: colour})),
    ` ${name}`)));
}

function deniedText(denied) {
  const entries = Object.entries(denied || {}).filter(([, n]) => n > 0);
  return entries.length ? entries.map(([code, n]) => `${code} ${n}`).join(', ') : '0';
}

// The usage figure: requests (allowed, and denied by code) and responses by
// status class, per bucket, plus a table of the non-empty buckets.
export function usageFigure({buckets, from, to, granularity, caption, width}) {
  const chartWidth = Math.round(Math.min(MAX_WIDTH, Math.max(MIN_WIDTH, width || MAX_WIDTH)));
  const slots = timeline(buckets, from, to, granularity);
  const codes = [...new Set((buckets || []).flatMap((b) => Object.keys(b.denied || {})))].sort();
  const colourOf = new Map(codes.map((code, i) => [code, DENIED[i % DENIED.length]]));
  const requests = bars({
    slots, granularity, width: chartWidth, title: `${caption}: allowed and denied requests`,
    series: (b) => [['allowed', b.allowed, ALLOWED], ...codes.map((c) => [c, (b.denied || {})[c] || 0, colourOf.get(c)])],
    describe: (b) => `${b.requests} requests, ${b.allowed} allowed, denied: ${deniedText(b.denied)}`,
  });
  const statuses = bars({
    slots, granularity, width: chartWidth, title: `${caption}: responses by status class`,
    series: (b) => CLASSES.map(([name, colour]) => [name, (b.status || {})[name] || 0, colour]),
    describe: (b) => CLASSES.map(([name]) => `${name} ${(b.status || {})[name] || 0}`).join(', '),
  });
  const rows = slots.filter((slot) => slot.bucket && slot.bucket.requests > 0);
  const table = rows.length
    ? h('div', {class: 'table-wrap'}, h('table', {class: 'usage-table'},
      h('caption', {}, caption),
      h('thead', {}, h('tr', {},
        ['Start', 'Requests', 'Allowed', 'Denied', ...CLASSES.map(([n]) => n)].map((t) => h('th', {scope: 'col'}, t)))),
      h('tbody', {}, rows.map(({start, bucket}) => h('tr', {},
        h('th', {scope: 'row'}, formatTime(start)),
        h('td', {}, String(bucket.requests)),
        h('td', {}, String(bucket.allowed)),
        h('td', {}, deniedText(bucket.denied)),
        CLASSES.map(([n]) => h('td', {}, String((bucket.status || {})[n] || 0))))))))
    : h('p', {class: 'muted'}, 'No requests in this period.');
  const used = new Set(rows.flatMap((r) => Object.keys(r.bucket.denied || {})));
  return h('figure', {class: 'usage-chart', dataset: {buckets: String(rows.length)}},
    h('figcaption', {}, caption),
    h('h4', {}, 'Requests'),
    requests,
    legend([['allowed', ALLOWED], ...codes.filter((c) => used.has(c)).map((c) => [`denied: ${c}`, colourOf.get(c)])]),
    h('h4', {}, 'Responses by status class'),
    statuses,
    legend(CLASSES),
    h('details', {class: 'as-table'}, h('summary', {}, 'Show as a table'), table));
}

export function totalsOf(buckets) {
  const totals = {requests: 0, allowed: 0, denied: 0};
  for (const b of buckets || []) {
    totals.requests += b.requests || 0;
    totals.allowed += b.allowed || 0;
    totals.denied += total(b.denied);
  }
  return totals;
}

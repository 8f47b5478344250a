// Server-Sent Events over fetch(). EventSource cannot send an Authorization
// header, so the stream is read with a ReadableStream reader and parsed here
// (the WHATWG event-stream format: `id`, `event`, `data`, `retry`, `:` comments).

// Feeds on text chunks, cut anywhere; calls `onEvent({id, event, data})` per event.
// `id` is the last event id seen so far (events without one keep the previous).
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.started = false;
    this.skipLf = false;
    this.lastId = '';
    this.retry = null;
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.hasData = false;
  }

  push(chunk) {
    let text = chunk;
    if (!this.started && text.length) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    // A CR that ended the last chunk already ended its line: drop the LF after it.
    if (this.skipLf && text.startsWith('\n')) text = text.slice(1);
    this.skipLf = false;
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf('\r', start);
      const lf = this.buffer.indexOf('\n', start);
      if (cr < 0 && lf < 0) break;
      let end;
      let next;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        end = cr;
        if (cr + 1 < this.buffer.length) {
          next = this.buffer[cr + 1] === '\n' ? cr + 2 : cr + 1;
        } else {
          next = cr + 1;
          this.skipLf = true;
        }
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === '') {
      this.dispatch();
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (name) {
      case 'event':
        this.event = value;
        break;
      case 'data':
        this.data.push(value);
        this.hasData = true;
        break;
      case 'id':
        if (!value.includes('\0')) this.lastId = value;
        break;
      case 'retry':
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break;
    }
  }

  dispatch() {
    if (this.hasData) {
      this.onEvent({id: this.lastId, event: this.event || 'message', data: this.data.join('\n')});
    }
    this.reset();
  }
}

const MIN_DELAY = 1000;
const MAX_DELAY = 30000;
// A stream silent for this long is taken as dead (servers send comments to keep it open).
const SILENCE = 75000;

// A subscription that reconnects with backoff and resumes with `Last-Event-ID`.
// `onState` gets 'connecting', 'live' or 'offline'; `onEvent` gets `{id, event, data}`
// with `data` parsed as JSON; `onUnauthorized` runs on a 401 (and the stream stops).
export class EventStream {
  constructor({url, token, onEvent, onState, onUnauthorized}) {
    Object.assign(this, {url, token, onEvent, onState, onUnauthorized});
    this.lastId = '';
    // The server's `retry:` advice, in milliseconds; backoff never goes below it.
    this.retry = null;
    this.stopped = true;
    this.controller = null;
    this.wake = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
    if (this.wake) this.wake();
  }

  state(value) {
    if (this.onState) this.onState(value);
  }

  async run() {
    let delay = MIN_DELAY;
    while (!this.stopped) {
      this.state('connecting');
      const outcome = await this.connect();
      if (this.stopped) break;
      if (outcome === 'unauthorized') {
        this.stopped = true;
        this.state('offline');
        if (this.onUnauthorized) this.onUnauthorized();
        break;
      }
      if (outcome === 'opened') delay = MIN_DELAY;
      this.state('offline');
      const wait = Math.max(delay, this.retry || 0) * (0.8 + Math.random() * 0.4);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, wait);
        this.wake = () => { clearTimeout(timer); resolve(); };
      });
      this.wake = null;
      delay = Math.min(delay * 2, MAX_DELAY);
    }
  }

  // One connection, until it ends: 'unauthorized', 'failed' (never opened) or 'opened'.
  async connect() {
    const controller = new AbortController();
    this.controller = controller;
    const headers = {Accept: 'text/event-stream', Authorization: `Bearer ${this.token()}`};
    if (this.lastId) headers['Last-Event-ID'] = this.lastId;
    let silence = null;
    let opened = false;
    const watch = () => {
      clearTimeout(silence);
      silence = setTimeout(() => controller.abort(), SILENCE);
    };
    try {
      const response = await fetch(this.url, {headers, signal: controller.signal, cache: 'no-store', credentials: 'omit'});
      if (response.status === 401) return 'unauthorized';
      const type = response.headers.get('content-type') || '';
      if (!response.ok || !response.body || !type.startsWith('text/event-stream')) {
        if (response.body) response.body.cancel().catch(() => {});
        return 'failed';
      }
      opened = true;
      this.state('live');
      const parser = new SseParser((event) => this.deliver(event));
      parser.lastId = this.lastId;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      watch();
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        watch();
        parser.push(value);
        this.lastId = parser.lastId;
        if (parser.retry !== null) this.retry = parser.retry;
      }
      return 'opened';
    } catch {
      // Aborted (stopped, or silent too long) or cut off.
      return opened ? 'opened' : 'failed';
    } finally {
      clearTimeout(silence);
    }
  }

  deliver(event) {
    let data = null;
    try {
      data = JSON.parse(event.data);
    } catch {
      data = event.data;
    }
    try {
      this.onEvent({id: event.id, event: event.event, data});
    } catch (e) {
      console.error('keygate console: an event handler failed', e);
    }
  }
}

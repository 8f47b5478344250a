// The admin API client. The token lives in sessionStorage only: it is gone when
// the browser session ends, it never appears in a URL, and it is never logged.

const TOKEN_KEY = 'keygate.admin_token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// An error answer of the admin API, with the contract's `error.code` and `error.message`.
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const unauthorizedHandlers = new Set();

// `f` runs when the API answers 401: the token is no longer valid.
export function onUnauthorized(f) {
  unauthorizedHandlers.add(f);
}

export function unauthorized() {
  clearToken();
  for (const f of unauthorizedHandlers) f();
}

// `path` with the query's non-empty values.
export function withQuery(path, query) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') params.set(name, value);
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

// Calls the admin API and answers its JSON (null for an empty body); throws `ApiError`.
export async function api(method, path, {query, body} = {}) {
  const headers = {Accept: 'application/json'};
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(withQuery(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    throw new ApiError(0, 'network_error', `The admin API cannot be reached (${e.message}).`);
  }
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (!response.ok) {
    const error = json && json.error;
    const code = (error && error.code) || `http_${response.status}`;
    const message = (error && error.message) || `${method} ${path.split('?')[0]} answered ${response.status}.`;
    if (response.status === 401) unauthorized();
    throw new ApiError(response.status, code, message);
  }
  return json;
}

// Who the token belongs to: `{name, role}`. A node without `/v1/whoami` is
// asked for one key instead (which checks the token) and is taken to grant admin.
export async function whoami() {
  try {
    const me = await api('GET', '/v1/whoami');
    return {name: (me && me.name) || null, role: me && me.role === 'read' ? 'read' : 'admin'};
  } catch (e) {
    if (e.status !== 404 && e.status !== 405) throw e;
  }
  await api('GET', '/v1/keys', {query: {limit: 1}});
  return {name: null, role: 'admin'};
}

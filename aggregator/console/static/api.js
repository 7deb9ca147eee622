// The one way to the API: a bearer token from this tab's session storage (never a cookie, a URL
// or local storage, so it goes when the tab does), JSON in and out, errors as ApiError.

export class Session {
  constructor(key) {
    this.key = key;
  }
  get token() {
    return sessionStorage.getItem(this.key);
  }
  set token(value) {
    if (value) sessionStorage.setItem(this.key, value);
    else sessionStorage.removeItem(this.key);
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
  }
}

function describe(status, body) {
  if (status === 401) return `The token was refused (401): ${body?.error_description || body?.detail || "unknown token"}`;
  if (Array.isArray(body?.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return `${status}: ${body?.detail || body?.error || "request failed"}`;
}

function url(path, params = {}) {
  const found = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    for (const one of [].concat(value)) {
      if (one !== undefined && one !== null && one !== "") found.searchParams.append(name, one);
    }
  }
  return found;
}

export async function api(session, path, { method = "GET", params, body, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url(path, params), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Server-sent events over fetch: EventSource cannot send an Authorization header, and a token in
// the URL would end up in logs. Calls onEvent(name, data) per event ("open" once connected) until
// the stream ends or `signal` aborts.
export async function stream(session, path, params, onEvent, signal) {
  const response = await fetch(url(path, params), {
    headers: { Authorization: `Bearer ${session.token}`, Accept: "text/event-stream" },
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
        else if (field === "" && text === "open") onEvent("open", null); // a comment
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// `stream` kept open: reconnects after a second whenever it ends (a server restart, a network
// change) until `signal` aborts; onEvent("closed") each time it is down.
export async function follow(session, path, params, onEvent, signal) {
  while (!signal.aborted) {
    try {
      await stream(session, path, params, onEvent, signal);
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 401) return onEvent("unauthorized", error);
    }
    onEvent("closed", null);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

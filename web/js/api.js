/**
 * api.js — loop's JSON API, as the UI calls it (the same API as the CLI and SDK users; see the API contract).
 *
 * - `api(path, opts)` does one JSON request and throws `ApiError` carrying the server's own message
 *   (`{"error": {"message": ...}}`), so the banner shows what to fix, not just a status code.
 * - `streamChat(body, onEvent)` posts to /v1/chat/completions with stream=true and parses the SSE stream from
 *   a fetch ReadableStream (EventSource cannot POST).
 * - The admin token and a rater's token live in sessionStorage only (per tab, gone when it closes), never in
 *   localStorage or a cookie. Signed in with a rater's token, every request carries it and ratings are filed
 *   under that account's name (`whoami()` asks the server whose token it is).
 */

const TOKEN_KEY = "loop.adminToken";
const RATER_KEY = "loop.rater";
const RATER_TOKEN_KEY = "loop.raterToken";

export class ApiError extends Error {
  constructor(status, message, {type = null, code = null, body = null} = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.body = body;
  }
}

export function adminToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setAdminToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function raterToken() {
  return sessionStorage.getItem(RATER_TOKEN_KEY) || "";
}

export function setRaterToken(token) {
  if (token) sessionStorage.setItem(RATER_TOKEN_KEY, token);
  else sessionStorage.removeItem(RATER_TOKEN_KEY);
  identity = null;
}

let identity = null;  // {rater, role, tokens_required} from GET /api/me

/** Who this tab is signed in as (the server's answer for its token); throws ApiError 401 when the token is
 * missing where the loop requires one, or is not valid. */
export async function whoami() {
  identity = await api("/api/me");
  return identity;
}

export function signedIn() {
  return identity && identity.rater ? identity : null;
}

/** The name ratings are filed under: the signed-in account's, else the one typed here (remembered across visits:
 * it is not a secret). */
export function raterName() {
  if (identity && identity.rater) return identity.rater;
  return localStorage.getItem(RATER_KEY) || "anonymous";
}

export function setRaterName(name) {
  const clean = (name || "").trim();
  if (clean && clean !== "anonymous") localStorage.setItem(RATER_KEY, clean);
  else localStorage.removeItem(RATER_KEY);
}

/** A random idempotency key. crypto.randomUUID needs a secure context; getRandomValues works everywhere. */
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "ui-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Query string from an object, skipping empty values. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    search.set(k, String(v));
  }
  const s = search.toString();
  return s ? `?${s}` : "";
}

async function errorFrom(response) {
  let body = null;
  let message = `${response.status} ${response.statusText || "error"}`;
  let type = null;
  let code = null;
  try {
    body = await response.json();
    const err = body && body.error;
    if (err && typeof err === "object") {
      message = err.message || message;
      type = err.type || null;
      code = err.code || null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // Not JSON (a proxy page, a dropped connection): keep the status line.
  }
  return new ApiError(response.status, message, {type, code, body});
}

/**
 * One JSON request. opts: method, body (object → JSON), admin (send the token), headers, signal.
 * Network failures become ApiError(0, ...) so callers handle one error type.
 */
export async function api(path, {method = "GET", body, admin = false, headers = {}, signal} = {}) {
  const init = {method, headers: {Accept: "application/json", ...headers}, signal};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (admin) {
    const token = adminToken() || (identity && identity.role === "admin" ? raterToken() : "");
    if (!token) throw new ApiError(401, "This needs the admin token: enter it in the Training view first.");
    init.headers.Authorization = `Bearer ${token}`;
  } else if (raterToken()) {
    init.headers.Authorization = `Bearer ${raterToken()}`;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, `Could not reach loop (${err && err.message ? err.message : "network error"}). ` +
      "Check that the server is running, then retry.");
  }
  if (!response.ok) throw signInHint(await errorFrom(response));
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** A refusal for want of a (valid) token: tell the shell, which offers the sign-in form. */
function signInHint(err) {
  if (err.status === 401 && (err.code === "token_missing" || err.code === "token_wrong")) {
    window.dispatchEvent(new CustomEvent("loop:sign-in", {detail: {code: err.code}}));
  }
  return err;
}

/** Is this the "route does not exist" 404 (as opposed to "that response id does not exist")? */
export function isMissingRoute(err) {
  return err instanceof ApiError && (err.status === 404 || err.status === 405) &&
    (err.status === 405 || /^(Not Found|404 .*)$/i.test(err.message) || err.code === "route_not_found");
}

/**
 * Stream a chat completion. Calls onEvent({type: "start", responseId, weightVersion}) once headers arrive,
 * (weightVersion: the version the latest chunk arrived under; firstVersion: the first token's)
 * onEvent({type: "delta", text, responseId, weightVersion, finishReason}) per chunk, and resolves with
 * {content, responseId, weightVersion, finishReason} when the stream ends.
 */
export async function streamChat(body, onEvent, {signal} = {}) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", signal,
      headers: {"Content-Type": "application/json", Accept: "text/event-stream",
        ...(raterToken() ? {Authorization: `Bearer ${raterToken()}`} : {})},
      body: JSON.stringify({...body, stream: true}),
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "Could not reach loop to start the answer. Check the server, then retry.");
  }
  if (!response.ok) throw signInHint(await errorFrom(response));
  const result = {
    content: "",
    responseId: (response.headers.get("X-Loop-Response-Id") || "").split(",")[0].trim() || null,
    weightVersion: parseVersion(response.headers.get("X-Loop-Weight-Version")),
    finishReason: null,
  };
  result.firstVersion = result.weightVersion;  // the first token's; weightVersion follows the chunks
  onEvent({type: "start", ...result});

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let done = false;
  while (!done) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, {stream: true}).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") { done = true; break; }
      let parsed;
      try { parsed = JSON.parse(data); } catch { continue; }
      if (parsed.error) {
        const err = parsed.error;
        throw new ApiError(err.code && Number.isInteger(err.code) ? err.code : 502,
          (typeof err === "object" ? err.message : String(err)) || "the model stopped with an error");
      }
      const choice = (parsed.choices || [])[0];
      if (!choice) continue;
      const text = (choice.delta && choice.delta.content) || "";
      result.responseId = choice.loop_response_id || parsed.id || result.responseId;
      const v = parseVersion(choice.loop_weight_version);  // the version this chunk arrived under
      if (v !== null) result.weightVersion = v;
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
      result.content += text;
      onEvent({type: "delta", text, ...result});
    }
  }
  return result;
}

function parseVersion(value) {
  if (value === null || value === undefined || value === "") return null;
  const n = Number(value);
  return Number.isFinite(n) ? n : null;
}

let modelPromise = null;
/** The served model's name, from /v1/models (cached; reset on failure so a later call retries). */
export function servedModel() {
  if (!modelPromise) {
    modelPromise = api("/v1/models").then((r) => (r.data && r.data[0] && r.data[0].id) || null)
      .catch((err) => { modelPromise = null; throw err; });
  }
  return modelPromise;
}

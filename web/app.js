/**
 * app.js — the shell: hash routing between the four views, the error banner, the health pill.
 *
 * Views are modules exporting `mount(main, params) → cleanup?`. The shell mounts one at a time and calls its
 * cleanup on leave (timers, key handlers, charts). Routes: #/chat, #/compare, #/history[?filters],
 * #/history/<response id>, #/queue[?q=words], #/training. Run locally: `loop serve`, then open http://127.0.0.1:8000/.
 *
 * Sign-in (the header's account box): a rater pastes their token once per tab (kept in sessionStorage); the views
 * are mounted again so every rating widget loads that rater's own ratings. A loop that requires tokens shows the
 * form at once, and any request refused for want of a token brings it back.
 */

import {ApiError, servedModel, setRaterToken, signedIn, whoami} from "./js/api.js";
import {h, replace} from "./js/dom.js";
import {poller} from "./js/poll.js";
import * as chat from "./js/chat.js";
import * as compare from "./js/compare.js";
import * as historyView from "./js/history.js";
import * as queue from "./js/queue.js";
import * as training from "./js/training.js";

const VIEWS = {chat, compare, history: historyView, queue, training};
const TITLES = {chat: "Chat", compare: "Compare", history: "History", queue: "Queue", training: "Training"};

const main = document.getElementById("main");
let cleanup = null;
let currentKey = "";

// ---------------------------------------------------------------- banner

const banner = document.getElementById("banner");
const bannerText = banner.querySelector(".banner-text");
const bannerRetry = document.getElementById("banner-retry");
let retryAction = null;

/**
 * Show an error plainly. `retry` (optional) is re-run by the Retry button; the caller keeps the user's input,
 * so retrying never loses what they typed.
 */
function showError(message, {retry = null} = {}) {
  bannerText.textContent = message;
  retryAction = retry;
  bannerRetry.hidden = !retry;
  banner.hidden = false;
}

function clearError() {
  banner.hidden = true;
  bannerText.textContent = "";
  retryAction = null;
}

bannerRetry.addEventListener("click", () => {
  const action = retryAction;
  clearError();
  if (action) action();
});
document.getElementById("banner-close").addEventListener("click", clearError);

// ---------------------------------------------------------------- routing

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [pathPart, query = ""] = raw.split("?");
  const parts = pathPart.split("/").filter(Boolean).map(decodeURIComponent);
  const name = VIEWS[parts[0]] ? parts[0] : "chat";
  return {name, parts: parts.slice(1), query: new URLSearchParams(query)};
}

function route() {
  const {name, parts, query} = parseHash();
  const key = `${name}/${parts.join("/")}?${query.toString()}`;
  if (key === currentKey) return;
  const sameView = currentKey.split("/")[0] === name;
  currentKey = key;
  // A view may handle its own sub-route changes (history filters/detail) without a full remount.
  const view = VIEWS[name];
  if (sameView && cleanup && typeof cleanup.update === "function") {
    cleanup.update({parts, query});
    return;
  }
  if (cleanup) (cleanup.dispose || cleanup)();
  cleanup = null;
  clearError();
  main.replaceChildren();
  document.title = `${TITLES[name]} · loop`;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  cleanup = view.mount(main, {parts, query, showError, clearError, refreshHealth: () => healthPoll.now()}) || null;
}

window.addEventListener("hashchange", route);

function remount() {
  currentKey = "";
  if (cleanup) (cleanup.dispose || cleanup)();
  cleanup = null;
  route();
}

// ---------------------------------------------------------------- account

const account = document.getElementById("account");
let tokensRequired = false;

async function loadIdentity() {
  try {
    tokensRequired = Boolean((await whoami()).tokens_required);
    return null;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      tokensRequired = tokensRequired || err.code === "token_missing";
      if (err.code === "token_wrong") setRaterToken("");
      return err.code === "token_wrong" ? "That token is not valid (unknown or revoked)." : null;
    }
    return null;  // unreachable server: the health pill says so
  }
}

function renderAccount(message = null, open = false) {
  const me = signedIn();
  if (me) {
    replace(account,
      h("span", {class: "who"}, "Rating as ", h("strong", {text: me.rater}), me.role === "admin" ? " (admin)" : ""),
      h("button", {type: "button", class: "btn small ghost", text: "Sign out", onclick: async () => {
        setRaterToken("");
        await loadIdentity();
        renderAccount();
        remount();
      }}));
    return;
  }
  if (!tokensRequired && !open && !message) {
    replace(account, h("button", {type: "button", class: "btn small ghost", text: "Sign in",
      onclick: () => { renderAccount(null, true); account.querySelector("input").focus(); }}));
    return;
  }
  const input = h("input", {type: "password", autocomplete: "off", id: "rater-token", placeholder: "Your rater token",
    "aria-label": "Rater token"});
  const form = h("form", {onsubmit: async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    setRaterToken(token);
    const problem = await loadIdentity();
    renderAccount(problem, Boolean(problem));
    if (!problem) { clearError(); remount(); }
  }}, input, h("button", {type: "submit", class: "btn small", text: "Sign in"}));
  replace(account,
    message || tokensRequired ? h("span", {class: "needed", role: "status",
      text: message || "This loop needs a rater token"}) : null,
    form);
}

window.addEventListener("loop:sign-in", (e) => {
  const wrong = Boolean(e.detail && e.detail.code === "token_wrong");
  if (!wrong && account.querySelector("#rater-token")) return;  // the form is up: keep what is being typed
  if (wrong) setRaterToken("");
  tokensRequired = tokensRequired || (e.detail && e.detail.code === "token_missing");
  renderAccount(wrong ? "Your token no longer works (revoked?)." : null, true);
});

// ---------------------------------------------------------------- health

const health = document.getElementById("health");
const healthText = health.querySelector(".health-text");

/** One look at /health; resolves to {changed} for the poller (what the pill says moved). */
async function checkHealth() {
  const before = `${health.dataset.state}|${healthText.textContent}|${health.title}`;
  try {
    const h = await fetch("/health", {headers: {Accept: "application/json"}}).then((r) => r.json());
    const vllmState = (h.vllm && h.vllm.state) || "unknown";
    const version = h.weight_version ?? "?";
    health.dataset.state = h.status === "ok" ? "ok" : "degraded";
    healthText.textContent = h.status === "ok" ? `ready · weights v${version}` : `vLLM ${vllmState} · v${version}`;
    health.title = `API ${h.api || "?"}, vLLM ${vllmState}, database ${h.database || "?"}`;
  } catch {
    health.dataset.state = "down";
    healthText.textContent = "unreachable";
  }
  return {changed: before !== `${health.dataset.state}|${healthText.textContent}|${health.title}`};
}

async function showModel() {
  try {
    const name = await servedModel();
    if (name) document.getElementById("model-name").textContent = name;
  } catch {
    setTimeout(showModel, 5000); // vLLM still loading: try again shortly
  }
}

// every 10 s while the tab is visible, backing off to 60 s while the pill stays the same
const healthPoll = poller(checkHealth, {interval: 10000, max: 60000});
if (!location.hash) history.replaceState(null, "", "#/chat");
// who this tab is, before the first view asks for its own ratings
const signInProblem = await loadIdentity();
renderAccount(signInProblem);
route();
showModel();

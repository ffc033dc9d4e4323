/**
 * chat.js — the Chat view: talk to the current model, watch the answer stream in, rate it inline.
 *
 * Conversations are kept on the server per rater (GET/POST/PUT /api/conversations): the sidebar lists them, a
 * click reopens one, and the one open in this tab comes back after a reload (its id in sessionStorage). Each save
 * sends the revision the tab loaded; a save from a stale tab is refused ("changed in another tab") and nothing is
 * overwritten. Answers stream from /v1/chat/completions; each shows the weight version that wrote it and its
 * response id (a link to its history page). Regenerate keeps the earlier answers as siblings (‹ 1/2 ›), each with
 * its own rating; two siblings can go to Compare as an A/B pair. If a request fails, the message goes back into the
 * text box and the banner offers Retry — nothing typed is lost. Stop keeps the partial answer (it is logged and can
 * be rated like any other).
 */

import {ApiError, api, qs, raterName, servedModel, setRaterName, signedIn, streamChat} from "./api.js";
import {empty, field, fmtTime, h, replace} from "./dom.js";
import {renderMarkdown} from "./markdown.js";
import {ratingWidget} from "./rating.js";

// user turn: {role: "user", content}; assistant turn: {role: "assistant", siblings: [answer], shown}
// answer: {content, responseId, weightVersion, firstVersion?, finishReason?, stopped?, pending?, initial?}
const conversation = [];
const current = {id: null, revision: null, title: ""};
const settings = {system: "", temperature: 0.7, maxTokens: 256};
const OPEN_KEY = "loop.conversation";
const PAINT_MS = 100; // the longest a streaming answer waits for its next markdown render

/** Query parameters that say whose conversations these are, where the tab is not signed in. */
function whose() {
  const name = raterName();
  return !signedIn() && name !== "anonymous" ? {rater: name} : {};
}

function shownAnswer(turn) {
  return turn.siblings[turn.shown];
}

export function mount(main, {showError, clearError}) {
  let controller = null;
  let disposed = false;

  const log = h("div", {class: "chat-log", role: "log", "aria-live": "polite", "aria-label": "Conversation"});
  const input = h("textarea", {id: "chat-input", rows: "3", placeholder: "Ask the model something…",
    "aria-describedby": "chat-hint", maxlength: "100000"});
  const send = h("button", {type: "submit", class: "btn primary", text: "Send"});
  const stop = h("button", {type: "button", class: "btn", text: "Stop", hidden: true, onclick: () => controller?.abort()});
  const form = h("form", {class: "composer", onsubmit: (e) => { e.preventDefault(); sendMessage(); }},
    h("label", {for: "chat-input", class: "sr-only", text: "Message"}),
    input,
    h("div", {class: "composer-actions"},
      h("small", {id: "chat-hint", class: "hint", text: "Enter sends · Shift+Enter for a new line"}),
      stop, send));

  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });

  const system = h("textarea", {rows: "2", value: settings.system, placeholder: "Optional instructions for the model",
    oninput: () => { settings.system = system.value; }});
  const temperature = h("input", {type: "number", min: "0", max: "2", step: "0.1", value: String(settings.temperature),
    oninput: () => { settings.temperature = Number(temperature.value); }});
  const maxTokens = h("input", {type: "number", min: "1", max: "4096", step: "1", value: String(settings.maxTokens),
    oninput: () => { settings.maxTokens = Number(maxTokens.value); }});
  // signed in, the account's name is used (the server refuses another); else a free-text name
  const rater = h("input", {type: "text", value: raterName(), autocomplete: "nickname", disabled: Boolean(signedIn()),
    onchange: () => { setRaterName(rater.value); startNew(); render(); loadList(); }});
  const options = h("details", {class: "options"}, h("summary", {text: "Options"}),
    h("div", {class: "grid-fields"},
      field("System prompt", system),
      field("Temperature", temperature),
      field("Max tokens", maxTokens),
      field("Your name (for ratings)", rater)));

  const newChat = h("button", {type: "button", class: "btn ghost small", text: "New conversation",
    onclick: () => { if (!controller) { startNew(); render(); renderList(); input.focus(); } }});
  const listBody = h("ul", {class: "conv-items"});
  const sidebar = h("nav", {class: "conv-list", "aria-label": "Conversations"},
    h("h2", {class: "conv-head", text: "Conversations"}), listBody);
  let listed = [];

  main.append(h("section", {class: "view chat with-sidebar", "aria-labelledby": "chat-title"},
    sidebar,
    h("div", {class: "chat-main"},
      h("div", {class: "view-head"}, h("h1", {id: "chat-title", text: "Chat"}), newChat),
      options, log, form)));
  render();
  input.focus();
  loadList();
  const reopen = sessionStorage.getItem(OPEN_KEY);
  if (!conversation.length && reopen) openConversation(reopen, {quiet: true});

  function startNew() {
    conversation.length = 0;
    Object.assign(current, {id: null, revision: null, title: ""});
    sessionStorage.removeItem(OPEN_KEY);
  }

  // --- the sidebar
  async function loadList() {
    try {
      const data = await api(`/api/conversations${qs({...whose(), limit: 100})}`);
      if (disposed) return;
      listed = data.items || [];
    } catch (err) {
      if (disposed) return;
      listed = [];
      replace(listBody, h("li", {class: "error-text", text: `Conversations: ${err.message}`}));
      return;
    }
    renderList();
  }

  function renderList() {
    if (!listed.length) {
      replace(listBody, h("li", {class: "muted", text: "None yet: your chats are kept here."}));
      return;
    }
    replace(listBody, listed.map((c) => h("li", {},
      h("button", {type: "button", class: "conv-item", dataset: {conversation: c.id},
        "aria-current": c.id === current.id ? "true" : null, onclick: () => openConversation(c.id)},
      h("span", {class: "conv-title", text: c.title}),
      h("small", {class: "muted", text: fmtTime(c.updated_at)})))));
  }

  async function openConversation(id, {quiet = false} = {}) {
    if (controller) return;
    try {
      const c = await api(`/api/conversations/${encodeURIComponent(id)}${qs(whose())}`);
      if (disposed) return;
      conversation.length = 0;
      for (const t of c.turns) {
        if (t.role === "user") conversation.push({role: "user", content: t.content});
        else conversation.push({role: "assistant", shown: t.shown, siblings: t.siblings.map((s) => ({
          content: s.content, responseId: s.response_id, weightVersion: s.weight_version ?? null}))});
      }
      Object.assign(current, {id: c.id, revision: c.revision, title: c.title});
      sessionStorage.setItem(OPEN_KEY, c.id);
      clearError();
      render();
      renderList();
    } catch (err) {
      if (disposed) return;
      if (quiet) { sessionStorage.removeItem(OPEN_KEY); return; }  // gone, or another rater's: start afresh
      showError(`Could not open the conversation: ${err.message}`, {retry: () => openConversation(id)});
    }
  }

  // --- saving: the whole conversation, against the revision this tab loaded
  function turnsForServer() {
    return conversation.map((t) => t.role === "user" ? {role: "user", content: t.content} : {
      role: "assistant", shown: t.shown,
      siblings: t.siblings.map((a) => ({response_id: a.responseId, content: a.content,
        ...(a.weightVersion === null || a.weightVersion === undefined ? {} : {weight_version: a.weightVersion})}))});
  }

  let saving = Promise.resolve();
  function save() {
    // only answers that have a logged response belong in the record; saves run one after another
    if (conversation.some((t) => t.role === "assistant" && t.siblings.some((a) => !a.responseId || a.pending))) return saving;
    const body = {turns: turnsForServer()};  // what the screen shows now; the revision is read when it is sent
    saving = saving.then(async () => {
      try {
        const c = current.id
          ? await api(`/api/conversations/${encodeURIComponent(current.id)}${qs(whose())}`, {method: "PUT",
            body: {...body, expected_revision: current.revision}})
          : await api(`/api/conversations${qs(whose())}`, {method: "POST", body});
        Object.assign(current, {id: c.id, revision: c.revision, title: c.title});
        sessionStorage.setItem(OPEN_KEY, c.id);
        await loadList();
      } catch (err) {
        if (err instanceof ApiError && err.code === "stale_conversation") {
          showError("This conversation was changed in another tab; reopen it to see those changes (what you see " +
            "here was not saved over them).", {retry: () => openConversation(current.id)});
        } else {
          showError(`The conversation was not saved: ${err.message}`, {retry: save});
        }
      }
    });
    return saving;
  }

  // --- the log
  function render() {
    if (!conversation.length) {
      replace(log, empty("Say something to the model. Every answer is logged with the weights that wrote it, " +
        "and your ratings are what it learns from."));
      return;
    }
    replace(log, conversation.map((turn, i) => renderTurn(turn, i === conversation.length - 1)));
    log.scrollTop = log.scrollHeight;
  }

  function renderTurn(turn, isLast) {
    if (turn.role === "user") {
      return h("article", {class: "msg user", "aria-label": "You"},
        h("div", {class: "msg-who", text: "You"}), h("div", {class: "msg-body", text: turn.content}));
    }
    const el = renderMessage(shownAnswer(turn), isLast);
    if (turn.siblings.length > 1) el.querySelector(".msg-who").after(siblingNav(turn, isLast));
    return el;
  }

  function siblingNav(turn, isLast) {
    const n = turn.siblings.length;
    const go = (step) => {
      if (controller) return;
      turn.shown = (turn.shown + step + n) % n;
      render();
      save();
    };
    const nav = h("div", {class: "siblings", role: "group", "aria-label": "Answers to this message"},
      h("button", {type: "button", class: "btn ghost small", "aria-label": "Previous answer", text: "‹",
        disabled: !isLast, onclick: () => go(-1)}),
      h("span", {class: "sibling-count", text: `${turn.shown + 1}/${n}`}),
      h("button", {type: "button", class: "btn ghost small", "aria-label": "Next answer", text: "›",
        disabled: !isLast, onclick: () => go(1)}));
    if (isLast) {
      const other = turn.siblings[turn.shown === 0 ? 1 : turn.shown - 1];
      const a = shownAnswer(turn);
      nav.append(h("a", {class: "btn ghost small", href: `#/compare${qs({a: other.responseId, b: a.responseId})}`,
        title: "Pick the better of this answer and the one before it: an A/B pair the model trains on",
        text: "Compare with the previous answer"}));
    }
    return nav;
  }

  // While an answer streams, its markdown is re-rendered at most every PAINT_MS (each paint parses the whole answer
  // so far, so formatting appears as it arrives without a parse per token); render() paints the final text.
  let paintTimer = null; // one answer streams at a time
  function paintSoon(answer) {
    if (paintTimer) return;
    paintTimer = setTimeout(() => {
      paintTimer = null;
      replace(answer.el.body, renderMarkdown(answer.content, {headingLevel: 2}));
      log.scrollTop = log.scrollHeight;
    }, PAINT_MS);
  }

  function renderMessage(msg, isLast) {
    const body = h("div", {class: "msg-body markdown"}, renderMarkdown(msg.content, {headingLevel: 2}));
    const meta = h("div", {class: "msg-meta"}, metaParts(msg));
    const el = h("article", {class: "msg assistant", "aria-label": "Model", dataset: {responseId: msg.responseId || ""}},
      h("div", {class: "msg-who", text: "Model"}), body, meta);
    if (msg.responseId && !msg.pending) {
      // One widget per answer so its state (pressed thumb, typed comment) survives re-renders; a reopened answer
      // first loads this rater's current rating of it.
      if (!msg.widget && msg.initial === undefined) loadInitial(msg);
      else if (!msg.widget && msg.initial) msg.widget = ratingWidget(msg.responseId, {showError, initial: msg.initial});
      if (msg.widget) el.append(msg.widget);
    }
    if (isLast && !msg.pending) {
      el.append(h("div", {class: "msg-actions"},
        h("button", {type: "button", class: "btn ghost small", text: "Regenerate",
          title: "Another answer to the same message; this one stays (‹ › to switch)", onclick: regenerate})));
    }
    msg.el = {root: el, body, meta};
    return el;
  }

  async function loadInitial(msg) {
    msg.initial = null;  // loading
    try {
      const detail = await api(`/api/responses/${encodeURIComponent(msg.responseId)}`);
      msg.initial = (detail.ratings || []).find((r) => r.is_current && r.rater === raterName()) || {};
    } catch {
      msg.initial = {};
    }
    if (!disposed) render();
  }

  function metaParts(msg) {
    const parts = [];
    if (msg.weightVersion !== null && msg.weightVersion !== undefined) {
      const first = msg.firstVersion ?? msg.weightVersion;
      const spanned = first !== msg.weightVersion;
      parts.push(h("span", {class: "badge version",
        title: spanned ? `An update landed while this answer was generated: it began with weights v${first} and continued on v${msg.weightVersion}`
          : "Weight version that produced this answer",
        text: spanned ? `weights v${first}→${msg.weightVersion}` : `weights v${msg.weightVersion}`}));
    }
    if (msg.responseId) {
      parts.push(h("a", {class: "resp-id", href: `#/history/${encodeURIComponent(msg.responseId)}`,
        title: "Open this response in History", text: msg.responseId}));
    }
    if (msg.pending) parts.push(h("span", {class: "typing", text: "writing…"}));
    if (msg.stopped) parts.push(h("span", {class: "badge muted", text: "stopped"}));
    else if (msg.finishReason === "length") parts.push(h("span", {class: "badge muted", text: "cut at max tokens"}));
    return parts;
  }

  async function sendMessage() {
    const text = input.value.trim();
    if (!text || controller) return;
    clearError();
    conversation.push({role: "user", content: text});
    const turn = {role: "assistant", siblings: [], shown: 0};
    conversation.push(turn);
    input.value = "";
    const ok = await generate(turn);
    if (!ok) {
      // Put the message back where it was typed; Retry sends it again (generate dropped the empty turn).
      conversation.pop();
      input.value = text;
      render();
      input.focus();
    }
  }

  async function regenerate() {
    if (controller) return;
    clearError();
    const turn = conversation[conversation.length - 1];
    if (!turn || turn.role !== "assistant") return;
    await generate(turn, {isRegenerate: true});
  }

  /** Stream one answer into `turn` (a new sibling, shown); true on success (or user stop). */
  async function generate(turn, {isRegenerate = false} = {}) {
    const answer = {content: "", responseId: null, weightVersion: null, pending: true, initial: {}};
    const before = turn.shown;
    turn.siblings.push(answer);
    turn.shown = turn.siblings.length - 1;
    render();
    controller = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    log.setAttribute("aria-busy", "true");
    const dropAnswer = () => {
      turn.siblings.splice(turn.siblings.indexOf(answer), 1);
      turn.shown = Math.min(before, Math.max(0, turn.siblings.length - 1));
    };
    try {
      const model = await servedModel();
      const messages = [];
      if (settings.system.trim()) messages.push({role: "system", content: settings.system.trim()});
      for (const t of conversation) {
        if (t === turn) break;
        messages.push(t.role === "user" ? {role: "user", content: t.content} : {role: "assistant", content: shownAnswer(t).content});
      }
      const body = {model, messages, temperature: settings.temperature, max_tokens: settings.maxTokens};
      const result = await streamChat(body, (event) => {
        answer.responseId = event.responseId;
        answer.weightVersion = event.weightVersion;
        answer.firstVersion = event.firstVersion;
        answer.content = event.content;
        paintSoon(answer);
        replace(answer.el.meta, metaParts(answer));
        log.scrollTop = log.scrollHeight;
      }, {signal: controller.signal});
      Object.assign(answer, result, {pending: false});
      return true;
    } catch (err) {
      if (err && err.name === "AbortError") {
        answer.pending = false;
        answer.stopped = true;
        if (!answer.content && !answer.responseId) dropAnswer();
        return true;
      }
      dropAnswer();
      const why = err instanceof ApiError ? err.message : String(err);
      showError(`The model could not answer: ${why}`, {
        retry: isRegenerate ? regenerate : () => sendMessage(),
      });
      return false;
    } finally {
      controller = null;
      send.disabled = false;
      stop.hidden = true;
      log.setAttribute("aria-busy", "false");
      if (!turn.siblings.length) conversation.splice(conversation.indexOf(turn), 1);  // no answer came
      render();
      if (turn.siblings.length && !disposed) save();
    }
  }

  return () => { disposed = true; controller?.abort(); };
}

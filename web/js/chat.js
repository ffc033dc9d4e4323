/**
 * chat.js — the Chat view: talk to the current model, watch the answer stream in, rate it inline.
 *
 * The conversation lives in this module (it survives switching views, not a reload). Answers stream from
 * /v1/chat/completions; each shows the weight version that wrote it and its response id (a link to its history
 * page). If a request fails, the message goes back into the text box and the banner offers Retry — nothing
 * typed is lost. Stop keeps the partial answer (it is logged and can be rated like any other).
 */

import {ApiError, raterName, servedModel, setRaterName, signedIn, streamChat} from "./api.js";
import {empty, field, h, replace} from "./dom.js";
import {ratingWidget} from "./rating.js";

const conversation = []; // {role, content, responseId?, weightVersion?, finishReason?, stopped?}
const settings = {system: "", temperature: 0.7, maxTokens: 256};

export function mount(main, {showError, clearError}) {
  let controller = null;

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
    onchange: () => setRaterName(rater.value)});
  const options = h("details", {class: "options"}, h("summary", {text: "Options"}),
    h("div", {class: "grid-fields"},
      field("System prompt", system),
      field("Temperature", temperature),
      field("Max tokens", maxTokens),
      field("Your name (for ratings)", rater)));

  const newChat = h("button", {type: "button", class: "btn ghost small", text: "New conversation",
    onclick: () => { if (!controller) { conversation.length = 0; render(); input.focus(); } }});

  main.append(h("section", {class: "view chat", "aria-labelledby": "chat-title"},
    h("div", {class: "view-head"}, h("h1", {id: "chat-title", text: "Chat"}), newChat),
    options, log, form));
  render();
  input.focus();

  function render() {
    if (!conversation.length) {
      replace(log, empty("Say something to the model. Every answer is logged with the weights that wrote it, " +
        "and your ratings are what it learns from."));
      return;
    }
    replace(log, conversation.map((msg, i) => renderMessage(msg, i === conversation.length - 1)));
    log.scrollTop = log.scrollHeight;
  }

  function renderMessage(msg, isLast) {
    if (msg.role === "user") {
      return h("article", {class: "msg user", "aria-label": "You"},
        h("div", {class: "msg-who", text: "You"}), h("div", {class: "msg-body", text: msg.content}));
    }
    const body = h("div", {class: "msg-body", text: msg.content});
    const meta = h("div", {class: "msg-meta"}, metaParts(msg));
    const el = h("article", {class: "msg assistant", "aria-label": "Model", dataset: {responseId: msg.responseId || ""}},
      h("div", {class: "msg-who", text: "Model"}), body, meta);
    if (msg.responseId && !msg.pending) {
      // Keep one widget per answer so its state (pressed thumb, typed comment) survives re-renders.
      msg.widget = msg.widget || ratingWidget(msg.responseId, {showError});
      el.append(msg.widget);
    }
    if (isLast && !msg.pending) {
      el.append(h("div", {class: "msg-actions"},
        h("button", {type: "button", class: "btn ghost small", text: "Regenerate", onclick: regenerate})));
    }
    msg.el = {root: el, body, meta};
    return el;
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
    input.value = "";
    const ok = await generate();
    if (!ok) {
      // Put the message back where it was typed; Retry sends it again.
      conversation.pop();
      input.value = text;
      render();
      input.focus();
    }
  }

  async function regenerate() {
    if (controller) return;
    clearError();
    if (conversation.length && conversation[conversation.length - 1].role === "assistant") conversation.pop();
    await generate({isRegenerate: true});
  }

  /** Stream one answer for the conversation so far; true on success (or user stop). */
  async function generate({isRegenerate = false} = {}) {
    const answer = {role: "assistant", content: "", responseId: null, weightVersion: null, pending: true};
    conversation.push(answer);
    render();
    controller = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    log.setAttribute("aria-busy", "true");
    try {
      const model = await servedModel();
      const messages = [];
      if (settings.system.trim()) messages.push({role: "system", content: settings.system.trim()});
      for (const m of conversation) if (m !== answer) messages.push({role: m.role, content: m.content});
      const body = {model, messages, temperature: settings.temperature, max_tokens: settings.maxTokens};
      const result = await streamChat(body, (event) => {
        answer.responseId = event.responseId;
        answer.weightVersion = event.weightVersion;
        answer.firstVersion = event.firstVersion;
        answer.content = event.content;
        answer.el.body.textContent = event.content;
        replace(answer.el.meta, metaParts(answer));
        log.scrollTop = log.scrollHeight;
      }, {signal: controller.signal});
      Object.assign(answer, result, {pending: false});
      return true;
    } catch (err) {
      if (err && err.name === "AbortError") {
        answer.pending = false;
        answer.stopped = true;
        if (!answer.content && !answer.responseId) conversation.pop();
        return true;
      }
      conversation.splice(conversation.indexOf(answer), 1);
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
      render();
    }
  }

  return () => controller?.abort();
}

/**
 * dom.js — the only way the UI builds elements.
 *
 * Why: every string that reaches the page (model output, prompts, comments, tags, error messages) goes in as a
 * text node, never as HTML, so a response that contains markup renders as the characters it is. There is no
 * innerHTML with data anywhere in web/; `h()` is the single choke point. The one sanitised exception is
 * markdown.js: model answers rendered as markdown, with raw HTML escaped and the result passed through DOMPurify's
 * allow-list into a DocumentFragment.
 *
 *   h("button", {class: "btn", onclick: fn, "aria-label": "Send"}, "Send")
 */

/** Build an element. attrs: class, text, dataset, on<event> handlers, boolean props, other attributes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else if (key === "checked" || key === "disabled" || key === "selected" || key === "hidden") el[key] = Boolean(value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

/** Append children: strings/numbers become text nodes, arrays are flattened, null/false are skipped. */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace all children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A labelled form field: <label for=id>text</label> + control. Returns the wrapper. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = uid("f");
  return h("div", {class: "field"},
    h("label", {for: control.id, text: labelText}),
    control,
    hint ? h("small", {class: "hint", text: hint}) : null);
}

let counter = 0;
/** A page-unique id for label/aria wiring. */
export function uid(prefix = "id") {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** "2026-11-26T06:20:00Z" → local, short, readable. Unknown → the raw string. */
export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, {year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

/** Numbers with a sensible number of digits; non-numbers as-is. */
export function fmtNum(value, digits = 3) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 100 ? value.toFixed(1) : value.toPrecision(digits);
}

/** A small status line that screen readers announce politely. */
export function statusLine(cls = "status") {
  return h("p", {class: cls, role: "status", "aria-live": "polite"});
}

/** Set a status line's text and tone ("ok" | "error" | "busy" | ""). */
export function setStatus(el, text, tone = "") {
  el.textContent = text || "";
  el.dataset.tone = tone;
}

/** A definition list from [label, value] pairs; values are text. */
export function kvList(pairs) {
  return h("dl", {class: "kv"}, pairs.flatMap(([k, v]) => [h("dt", {text: k}), h("dd", {}, v ?? "—")]));
}

/** Empty-state box. */
export function empty(text) {
  return h("p", {class: "empty", text});
}

/**
 * markdown.js — the one place where model output becomes HTML: answers rendered as markdown, safely.
 *
 * Why: answers contain markdown (lists, code fences, tables), and plain text hides that structure. Every other
 * string in the UI goes in as text through dom.js; this module is the single sanctioned exception, and it keeps
 * three locks on it:
 *   1. marked (vendored, web/vendor/marked) turns markdown into HTML, with raw HTML in the answer escaped: an
 *      answer that says `<img src=x onerror=...>` shows those characters, it never becomes an element.
 *   2. DOMPurify (vendored, web/vendor/dompurify) sanitises that HTML against a strict allow-list: text-level
 *      and block tags only, no style/class/data attributes, no images, hrefs only http(s) and mailto; every kept
 *      link opens in a new tab with rel="noopener noreferrer nofollow".
 *   3. The page's CSP (script-src 'self', img-src 'self' data:) stays as it is.
 * Headings are demoted (`#` becomes `headingLevel`, h3 by default) so an answer never adds an <h1> to the page
 * outline. Output is a DocumentFragment, appended like any other node; nothing here assigns innerHTML.
 *
 *   el.append(renderMarkdown(answer.content))          // History: the answer sits under an <h2>
 *   el.append(renderMarkdown(text, {headingLevel: 2}))  // Chat / Compare: directly under the view's <h1>
 *
 * Tests: tests/browser/test_markdown_ui.py (elements, links, probes inside code and links) and the XSS probe in
 * tests/browser/test_ui.py; run with `.venv/bin/python -m pytest -m browser tests/browser/test_markdown_ui.py`.
 */

import {Marked} from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";

const ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

let headingShift = 2; // set per call by renderMarkdown; parsing is synchronous, so one call never sees another's

const marked = new Marked({
  async: false,
  gfm: true,
  breaks: true, // a single newline stays a line break, as the plain-text rendering showed it
  renderer: {
    // Raw HTML written by the model is shown as the characters it is (block and inline alike).
    html({text}) { return escapeHtml(text); },
    heading({tokens, depth}) {
      const level = Math.min(6, depth + headingShift);
      return `<h${level}>${this.parser.parseInline(tokens)}</h${level}>\n`;
    },
    // No images in answers: a link to the picture instead (its href passes the same filter as any link).
    image({href, text}) { return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`; },
    // Task-list boxes as characters, so no <input> needs to be allowed.
    checkbox({checked}) { return checked ? "☑ " : "☐ "; },
  },
});

const purify = DOMPurify(window); // an own instance: its hook and settings touch nothing else on the page
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const POLICY = {
  ALLOWED_TAGS: ["p", "br", "hr", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a"],
  ALLOWED_ATTR: ["href", "title", "start", "align"],
  // DOMPurify checks non-URI attributes against the URI pattern too; these two carry plain values.
  ADD_URI_SAFE_ATTR: ["start", "align"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

/** Markdown text -> sanitised DocumentFragment. headingLevel: what `#` becomes (2..6). */
export function renderMarkdown(text, {headingLevel = 3} = {}) {
  headingShift = Math.max(2, Math.min(6, headingLevel)) - 1;
  const html = marked.parse(String(text ?? ""));
  return purify.sanitize(html, POLICY);
}

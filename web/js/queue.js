/**
 * queue.js — the Queue view: unrated (or under-rated) answers one at a time, rated with the keyboard.
 *
 * The server picks the next answer (GET /api/queue/next: fewest raters first, oldest first; with assignment, the
 * answers N raters should share). Skips are this view's own state: the skipped ids go with every request and are
 * forgotten on reload. The rating widget is the one of Chat and History (rating.js), so a rating here saves and
 * merges exactly as it does there; "submit and next" saves the widget's whole state, then loads the next answer
 * once the server has stored it (a refused save keeps the answer on screen, with the widget saying why).
 * Keys (outside a text box): u / d thumbs, 1–9 and 0 (= 10) score, c comment, t tags, s skip, Enter submit and
 * next; Ctrl+Enter submits from anywhere, Escape leaves a text box. #/queue?q=words narrows the queue.
 */

import {api, raterName, signedIn} from "./api.js";
import {empty, fmtNum, fmtTime, h, replace, setStatus, statusLine} from "./dom.js";
import {ratingWidget} from "./rating.js";

const KEYS = [["u", "thumbs up"], ["d", "thumbs down"], ["1–9, 0", "score (0 = 10)"], ["c", "comment"],
  ["t", "tags"], ["s", "skip"], ["Enter", "submit & next"], ["Ctrl+Enter", "submit & next from a text box"]];

export function mount(main, {query, showError, clearError}) {
  const q = query.get("q") || "";
  const skipped = [];
  let item = null;
  let widget = null;
  let waiter = null;  // the submit-and-next waiting for the widget's save: {resolve}
  let loading = 0;    // drops answers to requests made before a newer one

  const progress = h("p", {class: "queue-progress", role: "status", "aria-live": "polite"});
  const skippedNote = h("span", {class: "muted queue-skipped"});
  const status = statusLine("status queue-status");
  const card = h("div", {class: "card queue-item", tabindex: "-1", "aria-label": "Answer to rate"});
  const statsBox = h("div", {class: "queue-stats"});
  const legend = h("ul", {class: "queue-keys", "aria-label": "Keyboard shortcuts"},
    KEYS.map(([k, what]) => h("li", {}, h("kbd", {text: k}), ` ${what}`)));
  const root = h("section", {class: "view queue", "aria-labelledby": "queue-title"},
    h("div", {class: "view-head"}, h("h1", {id: "queue-title", text: "Queue"}),
      h("div", {class: "queue-head"}, progress, skippedNote)),
    q ? h("p", {class: "muted", text: `Only answers containing “${q}”.`}) : null,
    legend, card, status,
    h("h2", {text: "Raters"}), statsBox);
  main.append(root);

  function params() {
    const search = new URLSearchParams();
    if (!signedIn()) search.set("rater", raterName());
    if (q) search.set("q", q);
    for (const id of skipped) search.append("skip", id);
    return `?${search}`;
  }

  async function load() {
    const mine = ++loading;
    replace(card, h("p", {class: "loading", text: "Loading the next answer…"}));
    let body;
    try {
      body = await api(`/api/queue/next${params()}`);
    } catch (err) {
      if (mine !== loading) return;
      replace(card, empty("Could not load the queue."));
      showError(`Could not load the next answer: ${err.message}`, {retry: load});
      return;
    }
    if (mine !== loading) return;
    clearError();
    const p = body.progress;
    progress.textContent = `${p.rated_by_you} rated · ${p.left_for_you} left`;
    skippedNote.textContent = skipped.length ? ` · ${skipped.length} skipped` : "";
    item = body.item;
    setStatus(status, "");
    if (item) showItem(item);
    else showEmpty();
    loadStats();
  }

  function showItem(it) {
    widget = ratingWidget(it.id, {showError, onSaved, initial: it.your_rating || {}});
    const messages = Array.isArray(it.messages) ? it.messages : null;
    replace(card,
      h("div", {class: "queue-meta muted"},
        h("span", {text: `${fmtTime(it.created_at)} · weights v${it.weight_version}`}),
        h("span", {text: it.raters === 1 ? " · 1 rater so far" : ` · ${it.raters} raters so far`}),
        h("a", {href: `#/history/${encodeURIComponent(it.id)}`, class: "queue-link", text: "details"})),
      h("h2", {text: "Prompt"}),
      messages ? h("div", {class: "messages"}, messages.map((m) => h("div", {class: `msg ${m.role === "user" ? "user" : "other"}`},
        h("div", {class: "msg-who", text: m.role}), h("div", {class: "msg-body", text: contentText(m.content)}))))
        : h("div", {class: "msg"}, h("div", {class: "msg-body", text: it.prompt_text || ""})),
      h("h2", {text: "Answer"}),
      h("div", {class: "msg assistant", dataset: {responseId: it.id}}, h("div", {class: "msg-body", text: it.completion || ""})),
      widget,
      h("div", {class: "form-actions"},
        h("button", {type: "button", class: "btn primary", text: "Submit & next", onclick: submitAndNext}),
        h("button", {type: "button", class: "btn", text: "Skip", onclick: skip})));
    card.dataset.responseId = it.id;
    card.focus({preventScroll: true});
  }

  function showEmpty() {
    widget = null;
    delete card.dataset.responseId;
    replace(card,
      empty(skipped.length ? `Nothing left to rate but the ${skipped.length} you skipped.` : "Nothing left to rate. Thank you!"),
      skipped.length ? h("button", {type: "button", class: "btn", text: "Show the skipped ones again",
        onclick: () => { skipped.length = 0; load(); }}) : null);
  }

  function onSaved() {
    // The widget tells of each stored save while it still counts as busy; a change made during that save (a
    // score typed right after a thumb) is sent right after it. Next only once the widget's last save is stored.
    setTimeout(() => {
      if (!waiter || waiter.button.disabled) return;
      const w = waiter;
      waiter = null;
      w.resolve(true);
    }, 0);
  }

  function skip() {
    if (!item) return;
    skipped.push(item.id);
    load();
  }

  /** Save what the widget shows (its Save button: the same idempotent save it makes on change), then the next
   * answer once the server has stored it; a refusal (the widget's status turns to an error) keeps this one. */
  async function submitAndNext() {
    if (!widget || waiter) return;
    const line = widget.querySelector(".rating-status");
    const saveButton = [...widget.querySelectorAll("button")].find((b) => /save/i.test(b.textContent));
    if (!saveButton || !line) return;
    let watch = null;
    const saved = new Promise((resolve) => {
      waiter = {button: saveButton, resolve: (ok) => { watch.disconnect(); resolve(ok); }};
      watch = new MutationObserver(() => {
        if (line.dataset.tone === "error" && waiter) {
          const w = waiter;
          waiter = null;
          w.resolve(false);
        }
      });
      watch.observe(line, {attributes: true, attributeFilter: ["data-tone"], childList: true});
    });
    setStatus(status, "Saving, then the next answer…", "busy");
    saveButton.click();
    if (await saved) load();
    else setStatus(status, "Not submitted: see the rating's message.", "error");
  }

  function setScore(value) {
    const select = widget.querySelector("select.score");
    if (!select) return;
    select.value = String(value);
    select.dispatchEvent(new Event("change"));
  }

  function focusField(cls) {
    const input = widget.querySelector(`input.${cls}`);
    if (!input) return;
    const details = input.closest("details");
    if (details) details.open = true;
    input.focus();
  }

  function onKey(event) {
    if (!widget || event.altKey || event.metaKey || event.isComposing) return;
    const target = event.target;
    const typing = target instanceof HTMLElement && (target.isContentEditable ||
      target.matches("input, textarea"));
    if (event.key === "Enter" && event.ctrlKey) {
      if (typing && !root.contains(target)) return;  // another form (sign-in) keeps its Enter
      event.preventDefault();
      submitAndNext();
      return;
    }
    if (event.ctrlKey) return;
    if (typing) {
      if (event.key === "Escape") card.focus({preventScroll: true});
      return;
    }
    const key = event.key;
    if (key === "Enter") {
      if (target instanceof HTMLElement && target.matches("button, a, summary, select")) return;  // their own Enter
      event.preventDefault();
      submitAndNext();
    } else if (key === "u" || key === "d") {
      event.preventDefault();
      widget.querySelector(`.thumb.${key === "u" ? "up" : "down"}`)?.click();
    } else if (/^[0-9]$/.test(key)) {
      event.preventDefault();
      setScore(key === "0" ? 10 : Number(key));
    } else if (key === "c" || key === "t") {
      event.preventDefault();
      focusField(key === "c" ? "comment" : "tags");
    } else if (key === "s") {
      event.preventDefault();
      skip();
    }
  }

  async function loadStats() {
    let stats;
    try {
      stats = await api("/api/queue/stats");
    } catch {
      replace(statsBox, empty("Could not load the raters' figures."));
      return;
    }
    const me = signedIn() ? signedIn().rater : raterName();
    const alpha = (a) => a.alpha === null ? "—" : fmtNum(a.alpha, 3);
    const rate = (a) => a.rate === null ? "—" : `${Math.round(a.rate * 100)} % of ${a.pairs}`;
    replace(statsBox,
      h("p", {class: "queue-alpha"}, "Agreement (Krippendorff's α): thumbs ",
        h("strong", {text: alpha(stats.agreement.thumbs)}), ` over ${stats.agreement.thumbs.items} shared answers · scores `,
        h("strong", {text: alpha(stats.agreement.scores)}), ` over ${stats.agreement.scores.items}`,
        stats.raters_per_item ? ` · each answer goes to ${stats.raters_per_item} raters` : ""),
      stats.raters.length ? h("div", {class: "table-wrap"}, h("table", {class: "runs queue-raters"},
        h("thead", {}, h("tr", {}, ["Rater", "Rated", "Thumbs up", "Thumbs down", "Mean score", "Last rated", "Agrees (thumbs)"]
          .map((t) => h("th", {scope: "col", text: t})))),
        h("tbody", {}, stats.raters.map((r) => h("tr", {class: r.rater === me ? "me" : null},
          h("th", {scope: "row", text: r.rater}), h("td", {text: r.ratings}), h("td", {text: r.thumbs_up}),
          h("td", {text: r.thumbs_down}), h("td", {text: fmtNum(r.mean_score)}), h("td", {text: fmtTime(r.last_rated_at)}),
          h("td", {text: rate(r.agreement)})))),
        h("tfoot", {}, h("tr", {}, h("th", {scope: "row", text: stats.totals.raters === 1 ? "1 rater" : `${stats.totals.raters} raters`}),
          h("td", {text: stats.totals.ratings}), h("td", {text: stats.totals.thumbs_up}),
          h("td", {text: stats.totals.thumbs_down}), h("td", {text: fmtNum(stats.totals.mean_score)}),
          h("td", {}), h("td", {})))))
        : empty("No ratings yet."));
  }

  document.addEventListener("keydown", onKey);
  load();
  return () => {
    loading += 1;
    document.removeEventListener("keydown", onKey);
  };
}

/** Message content may be a string or OpenAI content parts; show the text either way. */
function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((p) => (p && p.text) || "").join("");
  return content === null || content === undefined ? "" : JSON.stringify(content);
}

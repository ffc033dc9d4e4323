/**
 * history.js — the History view: every logged response, filterable and paginated, with a detail page showing
 * all its ratings and comparisons, and export links for both TRL formats.
 *
 * Filters live in the URL hash (#/history?rating=up&q=paris&offset=50), so a filtered list can be bookmarked
 * and Back works. The export links carry the same filters (minus paging), so "export what I see" is one click.
 * Detail: #/history/<response id>.
 */

import {api, qs, raterName} from "./api.js";
import {empty, field, fmtNum, fmtTime, h, kvList, replace} from "./dom.js";
import {renderMarkdown} from "./markdown.js";
import {ratingWidget} from "./rating.js";

const FILTERS = ["q", "rating", "min_score", "max_score", "tag", "rater", "model", "weight_version", "since", "until",
  "sort", "limit", "offset"];
const PAGE = 25;
let lastListHash = "#/history";

export function mount(main, ctx) {
  const root = h("section", {class: "view history", "aria-labelledby": "history-title"});
  main.append(root);
  let token = 0; // drops answers to requests the user has already navigated away from

  function show({parts, query}) {
    token += 1;
    if (parts[0]) showDetail(root, parts[0], ctx, token, () => token);
    else showList(root, query, ctx, token, () => token);
  }
  show(ctx);
  return {update: show, dispose: () => { token += 1; }};
}

// ---------------------------------------------------------------- list

function filtersFrom(query) {
  const f = {};
  for (const name of FILTERS) if (query.get(name)) f[name] = query.get(name);
  return f;
}

/** ISO (UTC) → the value a datetime-local input shows (local time). */
function toLocalInput(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function showList(root, query, {showError, clearError}, myToken, current) {
  const f = filtersFrom(query);
  lastListHash = location.hash || "#/history";
  const limit = Number(f.limit) || PAGE;
  const offset = Number(f.offset) || 0;

  const input = (name, attrs = {}) => h("input", {name, value: f[name] || "", ...attrs});
  const q = input("q", {type: "search", placeholder: "words in prompt or answer"});
  const rating = h("select", {name: "rating"},
    [["", "any"], ["rated", "rated"], ["unrated", "unrated"], ["up", "thumbs up"], ["down", "thumbs down"]]
      .map(([v, t]) => h("option", {value: v, text: t, selected: (f.rating || "") === v})));
  const minScore = input("min_score", {type: "number", min: "1", max: "10"});
  const maxScore = input("max_score", {type: "number", min: "1", max: "10"});
  const tag = input("tag", {type: "text"});
  const rater = input("rater", {type: "text"});
  const model = input("model", {type: "text"});
  const version = input("weight_version", {type: "number", min: "0"});
  const since = h("input", {name: "since", type: "datetime-local", value: f.since ? toLocalInput(f.since) : ""});
  const until = h("input", {name: "until", type: "datetime-local", value: f.until ? toLocalInput(f.until) : ""});
  const sort = h("select", {name: "sort"},
    [["-created_at", "newest first"], ["created_at", "oldest first"], ["-score", "highest score"], ["score", "lowest score"]]
      .map(([v, t]) => h("option", {value: v, text: t, selected: (f.sort || "-created_at") === v})));

  const form = h("form", {class: "filters", role: "search", "aria-label": "Filter responses", onsubmit: (e) => {
    e.preventDefault();
    const next = {
      q: q.value.trim(), rating: rating.value, min_score: minScore.value, max_score: maxScore.value,
      tag: tag.value.trim(), rater: rater.value.trim(), model: model.value.trim(), weight_version: version.value,
      since: since.value ? new Date(since.value).toISOString() : "",
      until: until.value ? new Date(until.value).toISOString() : "",
      sort: sort.value === "-created_at" ? "" : sort.value,
      limit: f.limit || "",
    };
    location.hash = `#/history${qs(next)}`;
  }},
  h("div", {class: "grid-fields"},
    field("Search text", q), field("Rating", rating), field("Min score", minScore), field("Max score", maxScore),
    field("Tag", tag), field("Rater", rater), field("Model", model), field("Weight version", version),
    field("Since", since), field("Until", until), field("Sort", sort)),
  h("div", {class: "form-actions"},
    h("button", {type: "submit", class: "btn primary", text: "Apply filters"}),
    h("a", {class: "btn ghost", href: "#/history", text: "Clear"})));

  // The export routes filter by time, model, weight version and rater (not text/rating/tag: a pair is made of
  // two responses, so those filters have no single meaning there).
  const exportFilters = {};
  for (const k of ["since", "until", "model", "weight_version", "rater"]) if (f[k]) exportFilters[k] = f[k];
  const exports = h("div", {class: "exports", role: "group", "aria-label": "Export for TRL"},
    h("span", {class: "muted", text: "Export for TRL (time, model, version and rater filters apply):"}),
    h("a", {class: "btn small", href: `/api/export/preference.jsonl${qs(exportFilters)}`, download: "preference.jsonl",
      "data-export": "preference", text: "Preference pairs"}),
    h("a", {class: "btn small ghost", href: `/api/export/preference.jsonl${qs({...exportFilters, format: "standard"})}`,
      download: "preference-standard.jsonl", "data-export": "preference-standard", text: "Pairs (plain text)"}),
    h("a", {class: "btn small", href: `/api/export/unpaired.jsonl${qs(exportFilters)}`, download: "unpaired.jsonl",
      "data-export": "unpaired", text: "Unpaired (KTO)"}));

  const results = h("div", {class: "results", "aria-live": "polite", "aria-busy": "true"},
    h("p", {class: "loading", text: "Loading responses…"}));

  replace(root, h("div", {class: "view-head"}, h("h1", {id: "history-title", text: "History"})),
    h("details", {class: "options filters-box", open: Object.keys(f).some((k) => k !== "offset" && k !== "limit")},
      h("summary", {text: "Filters"}), form),
    exports, results);

  async function load() {
    clearError();
    results.setAttribute("aria-busy", "true");
    try {
      const page = await api(`/api/responses${qs({...f, limit, offset})}`);
      if (current() !== myToken) return;
      renderPage(page);
    } catch (err) {
      if (current() !== myToken) return;
      replace(results, empty("Could not load responses."));
      showError(`History could not be loaded: ${err.message}`, {retry: load});
    } finally {
      results.setAttribute("aria-busy", "false");
    }
  }

  function renderPage(page) {
    const items = page.items || [];
    if (!items.length) {
      replace(results, empty(Object.keys(f).length ? "No responses match these filters." :
        "No responses yet. Chat with the model or compare answers, and they appear here."));
      return;
    }
    const from = page.offset + 1;
    const to = page.offset + items.length;
    const go = (newOffset) => {
      location.hash = `#/history${qs({...f, offset: newOffset || ""})}`;
    };
    replace(results,
      h("p", {class: "count", text: `Showing ${from}–${to} of ${page.total}`}),
      h("ol", {class: "resp-list", start: String(from)}, items.map(renderItem)),
      h("nav", {class: "pager", "aria-label": "Pages"},
        h("button", {type: "button", class: "btn", text: "← Previous", "aria-label": "Previous page", disabled: page.offset <= 0,
          onclick: () => go(Math.max(0, page.offset - page.limit))}),
        h("button", {type: "button", class: "btn", text: "Next →", "aria-label": "Next page", disabled: to >= page.total,
          onclick: () => go(page.offset + page.limit)})));
  }

  load();
}

function ratingSummary(r) {
  if (!r || !r.count) return h("span", {class: "badge muted", text: "unrated"});
  const parts = [];
  if (r.thumbs_up) parts.push(h("span", {class: "badge up", title: "thumbs up", text: `▲ ${r.thumbs_up}`}));
  if (r.thumbs_down) parts.push(h("span", {class: "badge down", title: "thumbs down", text: `▼ ${r.thumbs_down}`}));
  if (r.mean_score !== null && r.mean_score !== undefined) {
    parts.push(h("span", {class: "badge", title: "mean score", text: `${fmtNum(r.mean_score, 2)}/10`}));
  }
  if (!parts.length) parts.push(h("span", {class: "badge", text: `${r.count} rating${r.count === 1 ? "" : "s"}`}));
  return parts;
}

/** "v4", or "v4→5" for a response an update landed in (generated first with v4, finished with v5). */
function versionSpan(r) {
  return spanned(r) ? `v${r.weight_version}→${r.weight_version_last}` : `v${r.weight_version}`;
}

function spanned(r) {
  return r.weight_version_last !== undefined && r.weight_version_last !== r.weight_version;
}

function spanTitle(r) {
  return spanned(r) ? `generated with weights v${r.weight_version} to v${r.weight_version_last}` : `weights v${r.weight_version}`;
}

function renderItem(item) {
  return h("li", {class: "resp-item", dataset: {responseId: item.id}},
    h("div", {class: "resp-top"},
      h("time", {datetime: item.created_at, text: fmtTime(item.created_at)}),
      h("span", {class: "badge version", text: versionSpan(item),
        title: spanTitle(item)}),
      ratingSummary(item.rating),
      (item.tags || []).map((t) => h("span", {class: "chip", text: t}))),
    h("a", {class: "resp-prompt", href: `#/history/${encodeURIComponent(item.id)}`,
      text: item.prompt_preview || "(no prompt)"}),
    h("p", {class: "resp-completion", text: item.completion || ""}));
}

// ---------------------------------------------------------------- detail

async function showDetail(root, id, {showError, clearError}, myToken, current) {
  clearError();
  const back = h("a", {class: "btn ghost small", href: lastListHash, text: "← Back to list"});
  const body = h("div", {class: "detail", "aria-live": "polite"}, h("p", {class: "loading", text: "Loading…"}));
  replace(root, h("div", {class: "view-head"}, h("h1", {id: "history-title", text: "Response"}), back), body);
  let resp;
  try {
    resp = await api(`/api/responses/${encodeURIComponent(id)}`);
  } catch (err) {
    if (current() !== myToken) return;
    replace(body, empty(err.status === 404 ? `No response with id ${id}.` : "Could not load this response."));
    if (err.status !== 404) {
      showError(`Could not load ${id}: ${err.message}`, {retry: () => showDetail(root, id, {showError, clearError}, myToken, current)});
    }
    return;
  }
  if (current() !== myToken) return;

  const ratingsBox = h("div", {class: "ratings-list"});
  const paintRatings = (ratings) => replace(ratingsBox, ratings.length ? h("ul", {class: "feedback"}, ratings.map(renderRating))
    : empty("No ratings yet."));
  paintRatings(resp.ratings || []);
  const refresh = async () => {
    try {
      const fresh = await api(`/api/responses/${encodeURIComponent(id)}`);
      paintRatings(fresh.ratings || []);
    } catch { /* the widget already said it saved; the list refreshes next visit */ }
  };

  const messages = Array.isArray(resp.messages) ? resp.messages : null;
  replace(body,
    kvList([
      ["Id", h("code", {text: resp.id})],
      ["Created", fmtTime(resp.created_at)],
      ["Model", resp.model],
      ["Weight version", `${versionSpan(resp)}${spanned(resp) ? " (an update landed while it was generated: it continued on the new weights)" : ""}`],
      ["Endpoint", resp.endpoint],
      ["Finish reason", resp.finish_reason],
      ["Latency", resp.latency_ms !== undefined && resp.latency_ms !== null ? `${fmtNum(resp.latency_ms)} ms` : "—"],
      ["Tokens", `${resp.prompt_tokens ?? "?"} in · ${resp.completion_tokens ?? "?"} out`],
    ]),
    h("h2", {text: "Prompt"}),
    messages ? h("div", {class: "messages"}, messages.map((m) => h("div", {class: `msg ${m.role === "user" ? "user" : "other"}`},
      h("div", {class: "msg-who", text: m.role}), h("div", {class: "msg-body", text: contentText(m.content)}))))
      : h("div", {class: "msg-body prompt-text", text: resp.prompt_text || resp.prompt_preview || ""}),
    h("h2", {text: "Answer"}),
    h("div", {class: "msg assistant"}, h("div", {class: "msg-body markdown"}, renderMarkdown(resp.completion || ""))),
    h("h2", {text: "Rate it"}),
    ratingWidget(resp.id, {showError, onSaved: refresh,
      initial: (resp.ratings || []).find((r) => r.is_current && r.rater === raterName()) || {}}),
    h("h2", {text: "Ratings"}), ratingsBox,
    h("h2", {text: "Comparisons"}),
    (resp.comparisons || []).length ? h("ul", {class: "feedback"}, resp.comparisons.map((c) => renderComparison(c, resp.id)))
      : empty("Not compared yet."),
    h("details", {class: "raw"}, h("summary", {text: "Raw JSON"}), h("pre", {text: JSON.stringify(resp, null, 2)})));
}

/** Message content may be a string or OpenAI content parts; show the text either way. */
function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((p) => (p && p.text) || "").join("");
  return content === null || content === undefined ? "" : JSON.stringify(content);
}

function renderRating(r) {
  return h("li", {class: `feedback-item${r.is_current ? "" : " superseded"}`, dataset: {ratingId: String(r.id)}},
    h("div", {class: "resp-top"},
      r.thumb ? h("span", {class: `badge ${r.thumb}`, text: r.thumb === "up" ? "▲ thumbs up" : "▼ thumbs down"}) : null,
      r.score !== null && r.score !== undefined ? h("span", {class: "badge", text: `score ${r.score}/10`}) : null,
      (r.tags || []).map((t) => h("span", {class: "chip", text: t})),
      r.is_current ? null : h("span", {class: "badge muted", text: "superseded"})),
    r.comment ? h("p", {class: "comment-text", text: r.comment}) : null,
    h("small", {class: "muted", text: `${r.rater} · ${fmtTime(r.created_at)}`}));
}

function renderComparison(c, selfId) {
  const selfIsA = c.response_a_id === selfId;
  const other = selfIsA ? c.response_b_id : c.response_a_id;
  const won = c.winner === "tie" ? "tie" : c.winner === "both_bad" ? "both bad"
    : (c.winner === "a") === selfIsA ? "this answer won" : "the other answer won";
  return h("li", {class: `feedback-item${c.is_current ? "" : " superseded"}`},
    h("div", {class: "resp-top"}, h("span", {class: "badge", text: won}),
      h("span", {class: "muted", text: "vs "}),
      h("a", {href: `#/history/${encodeURIComponent(other)}`, text: other})),
    c.comment ? h("p", {class: "comment-text", text: c.comment}) : null,
    h("small", {class: "muted", text: `${c.rater} · ${fmtTime(c.created_at)}`}));
}

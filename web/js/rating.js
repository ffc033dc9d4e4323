/**
 * rating.js — the inline rating widget (thumbs, 1–10 score, comment, tags) used under chat answers and in the
 * history detail view.
 *
 * The widget starts from the rater's current rating (opts.initial, with its id) and every save sends its whole
 * state with `expected_current_id`: the rating this screen shows. A rating changed elsewhere meanwhile (another
 * tab, the chat vs History) makes the server refuse the save (409 stale_rating) instead of replacing what the
 * rater never saw. Un-pressing the only thumb of a stored rating withdraws it (the server keeps it in history
 * and trains nothing on it). Each distinct payload gets one idempotency key, reused when the same payload is
 * sent again (retry after a network error, double click): the server stores it once. Everything saves on change
 * (a thumb or score at once, a comment or tags on Enter or leaving the field; Save saves too), and Undo puts
 * back what was stored before the last change (as a new rating: the history keeps both).
 */

import {api, newKey, raterName} from "./api.js";
import {h, setStatus, statusLine, uid} from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

/** A thumb icon drawn for this project (thumb up; `down` flips it). */
function thumbIcon(down) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "18");
  svg.setAttribute("height", "18");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("d", "M3 10h4v11H3zM7 10l4-7c1.6 0 2.6 1.1 2.6 2.6V9h5.2a2 2 0 0 1 2 2.3l-1.3 7.6a2 2 0 0 1-2 1.6H7");
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "currentColor");
  path.setAttribute("stroke-width", "1.8");
  path.setAttribute("stroke-linejoin", "round");
  svg.append(path);
  if (down) svg.style.transform = "rotate(180deg)";
  return svg;
}

/** Parse "a, b ,c" into ["a","b","c"] (trimmed, unique, no empties). */
export function parseTags(text) {
  return [...new Set((text || "").split(",").map((t) => t.trim()).filter(Boolean))];
}

/**
 * Build the widget for one response. opts.showError(message, {retry}) shows the banner; opts.onSaved(rating)
 * is told about each stored rating; opts.initial may carry {thumb, score, comment, tags} to start from.
 */
export function ratingWidget(responseId, {showError, onSaved, initial = {}} = {}) {
  const state = {thumb: initial.thumb ?? null, score: initial.score ?? null, currentId: initial.id ?? null};
  let lastPayload = "";
  let lastKey = "";
  let busy = false;
  let again = false;

  const up = h("button", {type: "button", class: "btn icon thumb up", "aria-label": "Thumbs up", "aria-pressed": "false",
    title: "Good answer", onclick: () => toggleThumb("up")}, thumbIcon(false));
  const down = h("button", {type: "button", class: "btn icon thumb down", "aria-label": "Thumbs down",
    "aria-pressed": "false", title: "Bad answer", onclick: () => toggleThumb("down")}, thumbIcon(true));

  const score = h("select", {class: "score", "aria-label": "Score from 1 to 10", onchange: () => submit()},
    h("option", {value: "", text: "Score"}),
    Array.from({length: 10}, (_, i) => h("option", {value: String(i + 1), text: `${i + 1} / 10`})));
  if (state.score) score.value = String(state.score);

  const commentId = uid("comment");
  const tagsId = uid("tags");
  const comment = h("input", {id: commentId, type: "text", class: "comment", placeholder: "What was good or bad?",
    maxlength: "4000", value: initial.comment || "", onkeydown: enterSaves, onchange: () => submit()});
  const tags = h("input", {id: tagsId, type: "text", class: "tags", placeholder: "e.g. factual, too long",
    value: (initial.tags || []).join(", "), onkeydown: enterSaves, onchange: () => submit()});
  const save = h("button", {type: "button", class: "btn small", text: "Save rating", onclick: () => submit()});
  // one step back: what was stored before the last save (pressing Undo again redoes it)
  let stored = fields();
  let before = stored;
  const undo = h("button", {type: "button", class: "btn small", text: "Undo", hidden: true,
    title: "Put back the rating as it was before the last change", onclick: () => restore(before)});
  const status = statusLine("status rating-status");

  const details = h("details", {class: "rate-more"},
    h("summary", {text: "Comment & tags"}),
    h("div", {class: "rate-fields"},
      h("div", {class: "field"}, h("label", {for: commentId, text: "Comment"}), comment),
      h("div", {class: "field"}, h("label", {for: tagsId, text: "Tags (comma-separated)"}), tags)));

  const root = h("div", {class: "rating", role: "group", "aria-label": "Rate this answer"},
    h("div", {class: "rate-row"}, up, down, score, save, undo, status), details);
  paint();

  function enterSaves(event) {
    if (event.key === "Enter") {
      event.preventDefault();
      submit();
    }
  }

  function paint() {
    up.setAttribute("aria-pressed", String(state.thumb === "up"));
    down.setAttribute("aria-pressed", String(state.thumb === "down"));
  }

  /** What the widget shows, as the server stores it. */
  function fields() {
    return {thumb: state.thumb, score: score.value ? Number(score.value) : null,
      comment: comment.value.trim() || null, tags: parseTags(tags.value)};
  }

  function restore(f) {
    state.thumb = f.thumb;
    score.value = f.score ? String(f.score) : "";
    comment.value = f.comment || "";
    tags.value = f.tags.join(", ");
    paint();
    submit();
  }

  function toggleThumb(which) {
    state.thumb = state.thumb === which ? null : which;
    paint();
    submit({fromThumb: true});
  }

  function payload() {
    // the whole state, empty fields included: the server merges a left-out field from the current rating
    return {response_id: responseId, ...fields(), rater: raterName(), expected_current_id: state.currentId};
  }

  async function submit({fromThumb = false} = {}) {
    if (busy) {  // a change made while a save is under way is saved right after it, not dropped
      again = true;
      return;
    }
    const body = payload();
    if (!body.thumb && body.score === null && !body.comment && !body.tags.length && state.currentId === null) {
      // Nothing stored and nothing to store (un-pressing a thumb that never saved).
      setStatus(status, fromThumb ? "" : "Pick a thumb or a score, or write a comment first.", fromThumb ? "" : "error");
      return;
    }
    // the same edit sent again (a retry, a double click) keeps its key even after the first save moved the
    // expected id: the server answers it with the stored rating
    const text = JSON.stringify({...body, expected_current_id: undefined});
    if (text !== lastPayload) {
      lastPayload = text;
      lastKey = newKey();
    }
    busy = true;
    save.disabled = true;
    setStatus(status, "Saving…", "busy");
    try {
      const rating = await api("/api/ratings", {method: "POST", body: {...body, idempotency_key: lastKey},
        headers: {"Idempotency-Key": lastKey}});
      if (rating.id !== state.currentId) {  // a new rating (not a replay of the same edit): one step to undo
        before = stored;
        undo.hidden = false;
      }
      stored = {thumb: body.thumb, score: body.score, comment: body.comment, tags: body.tags};
      state.currentId = rating.id;
      setStatus(status, rating.withdrawn ? "Rating withdrawn" : "Saved", "ok");
      root.dataset.saved = "true";
      if (onSaved) onSaved(rating);
    } catch (err) {
      again = false;  // the banner's Retry (or the next change) sends the whole state again
      setStatus(status, "Not saved", "error");
      if (err.code === "stale_rating") {
        if (showError) showError("Your rating of this answer changed elsewhere (another tab?); reload to see it, "
          + "then change it again. Nothing was saved.");
      } else if (showError) showError(`Your rating was not saved: ${err.message}`, {retry: () => submit()});
    } finally {
      busy = false;
      save.disabled = false;
      if (again) {
        again = false;
        submit();
      }
    }
  }

  return root;
}

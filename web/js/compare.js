/**
 * compare.js — the Compare view: one prompt, two sampled answers side by side, pick the better one fast.
 *
 * POST /api/candidates gives n=2 answers to the same prompt (same prompt hash, so the pair is valid for DPO);
 * POST /api/comparisons stores the pick. Keyboard: 1/a = A better, 2/b = B better, 3/t = tie, 4/x = both bad
 * (ignored while typing in a field), Enter in the prompt box asks, N asks again with the same prompt.
 * Picking again replaces the earlier pick (the server keeps the history; the newest is current).
 * `#/compare?a=<response id>&b=<response id>` opens two logged answers to the same messages as the pair (Chat sends
 * an answer and its regeneration here).
 */

import {api, newKey, raterName} from "./api.js";
import {empty, field, h, replace, setStatus, statusLine} from "./dom.js";
import {renderMarkdown} from "./markdown.js";

const CHOICES = [
  {winner: "a", label: "A is better", keys: ["1", "a"]},
  {winner: "b", label: "B is better", keys: ["2", "b"]},
  {winner: "tie", label: "Tie", keys: ["3", "t"]},
  {winner: "both_bad", label: "Both bad", keys: ["4", "x"]},
];
const WINNER_TEXT = {a: "A is better", b: "B is better", tie: "a tie", both_bad: "both bad"};

// Kept across view switches so a half-done comparison is still there when the user comes back.
const saved = {prompt: "", pair: null, picked: null, temperature: 0.9, maxTokens: 256};

export function mount(main, {query, showError, clearError}) {
  let loading = false;
  let picking = false;
  let lastPick = {payload: "", key: ""};

  const prompt = h("textarea", {id: "compare-prompt", rows: "3", placeholder: "A prompt to get two answers for…",
    value: saved.prompt, "aria-describedby": "compare-hint", oninput: () => { saved.prompt = prompt.value; }});
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ask();
    }
  });
  const askBtn = h("button", {type: "submit", class: "btn primary", text: "Get two answers"});
  const temperature = h("input", {type: "number", min: "0.1", max: "2", step: "0.1", value: String(saved.temperature),
    oninput: () => { saved.temperature = Number(temperature.value); }});
  const maxTokens = h("input", {type: "number", min: "1", max: "4096", value: String(saved.maxTokens),
    oninput: () => { saved.maxTokens = Number(maxTokens.value); }});
  const form = h("form", {class: "composer", onsubmit: (e) => { e.preventDefault(); ask(); }},
    h("label", {for: "compare-prompt", class: "field-label", text: "Prompt"}),
    prompt,
    h("details", {class: "options"}, h("summary", {text: "Options"}),
      h("div", {class: "grid-fields"}, field("Temperature", temperature), field("Max tokens", maxTokens))),
    h("div", {class: "composer-actions"},
      h("small", {id: "compare-hint", class: "hint", text: "Enter asks · then pick with 1 / 2 / 3 / 4 (or a / b / t / x)"}),
      askBtn));

  const results = h("div", {class: "compare-results", "aria-live": "polite"});
  const comment = h("input", {type: "text", placeholder: "Why? (optional)", maxlength: "4000"});
  const pickStatus = statusLine();
  const choiceButtons = CHOICES.map((c) => h("button", {type: "button", class: "btn choice", dataset: {winner: c.winner},
    "aria-keyshortcuts": c.keys.join(" "), "aria-pressed": "false", onclick: () => pick(c.winner)},
  h("kbd", {text: c.keys[0]}), " ", c.label, " ", h("kbd", {class: "alt", text: c.keys[1]})));
  const again = h("button", {type: "button", class: "btn ghost", onclick: () => ask()},
    "New pair ", h("kbd", {text: "n"}));
  const choices = h("div", {class: "choices", role: "group", "aria-label": "Which answer is better?"},
    choiceButtons, again);
  const pickArea = h("div", {class: "pick-area", hidden: true},
    choices, field("Comment", comment), pickStatus);

  main.append(h("section", {class: "view compare", "aria-labelledby": "compare-title"},
    h("div", {class: "view-head"}, h("h1", {id: "compare-title", text: "Compare"})),
    form, results, pickArea));
  renderPair();
  prompt.focus();
  if (query && query.get("a") && query.get("b")) loadPair(query.get("a"), query.get("b"));

  /** Two logged answers as the pair to pick from (their prompt: the messages they answered). */
  async function loadPair(a, b) {
    try {
      const [ra, rb] = await Promise.all([a, b].map((id) => api(`/api/responses/${encodeURIComponent(id)}`)));
      const users = (ra.messages || []).filter((m) => m && m.role === "user");
      const text = users.length ? String(users[users.length - 1].content) : (ra.prompt_text || ra.prompt_preview || "");
      showNewPair({prompt: text, candidates: [ra, rb].map((r) => ({response_id: r.id, content: r.completion,
        finish_reason: r.finish_reason, weight_version: r.weight_version}))});
    } catch (err) {
      showError(`Could not open the two answers: ${err.message}`, {retry: () => loadPair(a, b)});
    }
  }

  /** A pair nobody has picked from yet: no pick, no comment, a fresh idempotency key. */
  function showNewPair(pair) {
    saved.pair = pair;
    saved.picked = null;
    lastPick = {payload: "", key: ""};
    comment.value = "";
    setStatus(pickStatus, "");
    renderPair();
    choiceButtons[0].focus();
  }

  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = (e.target && e.target.tagName) || "";
    if (["INPUT", "TEXTAREA", "SELECT"].includes(tag) || (e.target && e.target.isContentEditable)) return;
    const key = e.key.toLowerCase();
    if (key === "n" && saved.pair) { e.preventDefault(); ask(); return; }
    const choice = CHOICES.find((c) => c.keys.includes(key));
    if (choice && saved.pair) {
      e.preventDefault();
      pick(choice.winner);
    }
  }
  document.addEventListener("keydown", onKey);

  async function ask() {
    const text = prompt.value.trim();
    if (!text || loading) {
      if (!text) prompt.focus();
      return;
    }
    clearError();
    loading = true;
    askBtn.disabled = true;
    replace(results, h("p", {class: "loading", text: "Generating two answers…"}));
    pickArea.hidden = true;
    try {
      const pair = await api("/api/candidates", {method: "POST", body: {
        messages: [{role: "user", content: text}], n: 2, rater: raterName(),
        temperature: saved.temperature, max_tokens: saved.maxTokens}});
      showNewPair({...pair, prompt: text});
    } catch (err) {
      saved.pair = null;
      replace(results);
      showError(`Could not get two answers: ${err.message}`, {retry: ask});
    } finally {
      loading = false;
      askBtn.disabled = false;
    }
  }

  function renderPair() {
    const pair = saved.pair;
    if (!pair) {
      replace(results, empty("Write a prompt and get two answers from the current model. " +
        "Your pick becomes a preference pair the model trains on."));
      pickArea.hidden = true;
      return;
    }
    const [a, b] = pair.candidates;
    replace(results,
      h("p", {class: "pair-prompt"}, h("span", {class: "muted", text: "Prompt: "}), pair.prompt),
      h("div", {class: "pair"}, card("A", a, a.weight_version ?? pair.weight_version),
        card("B", b, b.weight_version ?? pair.weight_version)));
    pickArea.hidden = false;
    paintPick();
  }

  function card(letter, cand, version) {
    return h("article", {class: "candidate", "aria-label": `Answer ${letter}`, dataset: {responseId: cand.response_id}},
      h("header", {class: "cand-head"},
        h("span", {class: "cand-letter", "aria-hidden": "true", text: letter}),
        h("span", {class: "badge version", text: `weights v${version ?? "?"}`}),
        cand.finish_reason === "length" ? h("span", {class: "badge muted", text: "cut at max tokens"}) : null),
      cand.content ? h("div", {class: "msg-body markdown"}, renderMarkdown(cand.content, {headingLevel: 2}))
        : h("div", {class: "msg-body", text: "(empty answer)"}),
      h("a", {class: "resp-id", href: `#/history/${encodeURIComponent(cand.response_id)}`, text: cand.response_id}));
  }

  function paintPick() {
    for (const btn of choiceButtons) btn.setAttribute("aria-pressed", String(btn.dataset.winner === saved.picked));
  }

  async function pick(winner) {
    const pair = saved.pair;
    if (!pair || picking) return;
    const [a, b] = pair.candidates;
    const body = {response_a_id: a.response_id, response_b_id: b.response_id, winner, rater: raterName()};
    if (comment.value.trim()) body.comment = comment.value.trim();
    const text = JSON.stringify(body);
    if (text !== lastPick.payload) lastPick = {payload: text, key: newKey()};
    picking = true;
    setStatus(pickStatus, "Saving…", "busy");
    try {
      await api("/api/comparisons", {method: "POST", body: {...body, idempotency_key: lastPick.key},
        headers: {"Idempotency-Key": lastPick.key}});
      saved.picked = winner;
      paintPick();
      setStatus(pickStatus, `Saved: ${WINNER_TEXT[winner]}. Press n for a new pair.`, "ok");
    } catch (err) {
      setStatus(pickStatus, "Not saved", "error");
      showError(`Your pick was not saved: ${err.message}`, {retry: () => pick(winner)});
    } finally {
      picking = false;
    }
  }

  return () => document.removeEventListener("keydown", onKey);
}

/**
 * training.js — the Training view: watch the model learn and steer it.
 *
 * Shows the trainer's live status with the current run's loss per step (GET /api/train/status), the feedback
 * waiting to be learned (GET /api/stats),
 * the scheduler with pause/resume, training runs with loss / reward accuracy / margin charts per step (uPlot,
 * vendored in web/vendor/uplot), the weight-version timeline with eval figures and, across runs, the training loss,
 * eval accuracy and canary perplexity by version (GET /api/versions), checkpoint and restore, and the
 * quarantine: feedback the screen before a run held back (GET /api/quarantine) with its evidence, to re-queue or
 * drop, beside each rater's signal (GET /api/raters/signal); rater accounts (GET/POST /api/raters: add one and
 * see its token once, revoke, issue a new token), for admins; and, when loop serves from several vLLMs, each
 * replica: serving or why not, requests in flight and served, its last sync (GET /health's `replicas`).
 * Admin actions send the token kept in sessionStorage. A route this server does not have yet shows
 * "… not available" in its card; the rest of the page keeps working.
 *
 * Refresh (web/js/poll.js; nothing while the tab is hidden): the trainer, scheduler and replicas cards every 2 s while a
 * run is in progress, otherwise every 4 s, backing off to 12 s while nothing changes; the feedback, runs and
 * versions cards every 10 s, backing off to 60 s, and at once when the trainer or scheduler cards show a change
 * (a run started or ended, a new weight version, new feedback waiting).
 */

import {adminToken, api, isMissingRoute, setAdminToken} from "./api.js";
import {empty, field, fmtNum, fmtTime, h, kvList, replace, setStatus, statusLine} from "./dom.js";
import {metricSeries, runChart} from "./charts.js";
import {poller} from "./poll.js";

const BUSY_STATES = new Set(["training", "applying"]);

export function mount(main, {showError, clearError, refreshHealth}) {
  const charts = [];
  let selectedRun = null;
  let followNewest = true;  // the charts follow the newest run until the reader picks one
  let disposed = false;

  // --- admin token
  const tokenInput = h("input", {id: "admin-token", type: "password", autocomplete: "off", value: adminToken(),
    placeholder: "LOOP_ADMIN_TOKEN or data_dir/admin_token"});
  const tokenStatus = statusLine();
  const tokenForm = h("form", {class: "token-form", onsubmit: (e) => {
    e.preventDefault();
    setAdminToken(tokenInput.value.trim());
    setStatus(tokenStatus, tokenInput.value.trim() ? "Token kept for this tab only." : "Token cleared.", "ok");
    loadRaters();
  }},
  field("Admin token", tokenInput, "Needed for pause/resume, training, checkpoints, restore and rater accounts. Kept in this tab only."),
  h("div", {class: "form-actions"},
    h("button", {type: "submit", class: "btn", text: "Use token"}),
    h("button", {type: "button", class: "btn ghost", text: "Forget", onclick: () => {
      tokenInput.value = "";
      setAdminToken("");
      setStatus(tokenStatus, "Token cleared.", "ok");
    }})),
  tokenStatus);

  // --- cards
  const statusBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const statsBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const schedBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const runsBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const chartBody = h("div", {class: "card-body charts"});
  const versionsBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const quarantineBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const replicasBody = h("div", {class: "card-body"});
  const signalBody = h("div", {class: "card-body"});
  const quarantineStatus = statusLine();
  const actionStatus = statusLine();
  const schedStatus = statusLine();
  const liveChart = h("div", {class: "live-chart"});
  const versionTrend = h("div", {class: "charts version-trend"});
  const trend = {key: "", charts: []};
  let live = {chart: null, key: ""};

  // --- rater accounts (admin)
  const ratersBody = h("div", {class: "card-body"}, h("p", {class: "loading", text: "Loading…"}));
  const raterStatus = statusLine();
  const newTokenBox = h("div", {class: "new-token", hidden: true, role: "status"});
  const raterName = h("input", {type: "text", maxlength: "200", autocomplete: "off", required: true});
  const raterRole = h("select", {}, h("option", {value: "rater", text: "rater"}), h("option", {value: "admin", text: "admin"}));
  const raterForm = h("form", {class: "rater-form", onsubmit: async (e) => {
    e.preventDefault();
    const name = raterName.value.trim();
    if (!name) return;
    const made = await admin("/api/raters", {name, role: raterRole.value}, `Account ${name} made.`, loadRaters, raterStatus);
    if (made) { raterName.value = ""; showToken(made); }
  }}, h("div", {class: "grid-fields"}, field("New rater's name", raterName), field("Role", raterRole)),
  h("div", {class: "form-actions"}, h("button", {type: "submit", class: "btn", text: "Add rater"})));

  const dialog = confirmDialog();
  const card = (title, id, ...content) => h("section", {class: "card", "aria-labelledby": id},
    h("h2", {id, text: title}), ...content);

  const replicasCard = card("Replicas", "c-replicas", replicasBody);
  replicasCard.hidden = true;  // shown when loop serves from more than one vLLM

  main.append(h("section", {class: "view training", "aria-labelledby": "training-title"},
    h("div", {class: "view-head"}, h("h1", {id: "training-title", text: "Training"})),
    h("details", {class: "options", open: !adminToken()}, h("summary", {text: "Admin token"}), tokenForm),
    h("div", {class: "cards"},
      card("Trainer", "c-status", statusBody, liveChart, actionStatus),
      card("Feedback", "c-stats", statsBody),
      card("Scheduler", "c-sched", schedBody)),
    replicasCard,
    card("Runs", "c-runs", runsBody, chartBody),
    card("Weight versions", "c-versions",
      h("div", {class: "form-actions"}, h("button", {type: "button", class: "btn", text: "Checkpoint now", onclick: checkpoint})),
      versionsBody),
    card("Quarantine", "c-quarantine", quarantineBody, quarantineStatus, signalBody),
    card("Rater accounts", "c-raters", ratersBody, raterForm, raterStatus, newTokenBox),
    dialog.el));

  // --- loaders; each card fails on its own. Each resolves to the data it showed (null after an error).
  async function load(body, path, render, name) {
    try {
      const data = await api(path);
      if (!disposed) render(data);
      return data;
    } catch (err) {
      if (disposed) return null;
      if (isMissingRoute(err)) replace(body, empty(`${name} not available on this server.`));
      else if (err.status === 503) replace(body, empty(err.message)); // a part that is not running: say so calmly
      else replace(body, h("p", {class: "error-text", text: `${name}: ${err.message}`}));
      return null;
    }
  }

  const loadStatus = () => load(statusBody, "/api/train/status", renderStatus, "Train status");
  // Timers take figures one recount old rather than wait for it (stale_ok): the server recounts in the background
  // and the next round shows the result.
  const loadStats = () => load(statsBody, "/api/stats?stale_ok=true", renderStats, "Feedback stats");
  const loadSched = () => load(schedBody, "/api/scheduler?stale_ok=true", renderSched, "Scheduler");
  const loadRuns = () => load(runsBody, "/api/runs", renderRuns, "Runs");
  const loadVersions = () => load(versionsBody, "/api/versions", renderVersions, "Versions");
  const loadQuarantine = () => Promise.all([
    load(quarantineBody, "/api/quarantine?state=held", renderQuarantine, "Quarantine"),
    load(signalBody, "/api/raters/signal", renderSignal, "Rater signal")]);

  /** /health's replicas (public, answered with 503 too when nothing serves): one row each, the card hidden with
   * one vLLM. Resolves to what it showed, for the heartbeat. */
  async function loadReplicas() {
    let replicas = null;
    try {
      const r = await fetch("/health", {headers: {Accept: "application/json"}});
      replicas = (await r.json()).replicas || null;
    } catch {
      return null;  // the health pill in the header says when loop cannot be reached
    }
    if (disposed) return null;
    replicasCard.hidden = !replicas;
    if (replicas) renderReplicas(replicas);
    return replicas && replicas.map((r) => [r.routable, r.why, r.vllm, r.synced_load, r.syncing]);
  }

  function renderReplicas(replicas) {
    const serving = replicas.filter((r) => r.routable).length;
    replace(replicasBody,
      h("p", {class: "muted", text: `${serving} of ${replicas.length} serving chat. Every update reaches all of them in one pause; one that is not serving gets the live weights before it serves again.`}),
      h("div", {class: "table-wrap"}, h("table", {class: "runs replicas"},
        h("thead", {}, h("tr", {}, ["Replica", "Address", "Serving", "vLLM", "In flight", "Served", "Last sync"]
          .map((t) => h("th", {scope: "col", text: t})))),
        h("tbody", {}, replicas.map((r) => h("tr", {dataset: {replica: String(r.index)}, class: r.routable ? "" : "out"},
          h("td", {text: String(r.index)}), h("td", {class: "addr", text: r.address || "—"}),
          h("td", {class: "why", text: r.routable ? "yes" : `no: ${r.why || "not routable"}`}),
          h("td", {text: r.vllm || "—"}), h("td", {text: String(r.in_flight ?? "—")}), h("td", {text: String(r.served ?? "—")}),
          h("td", {text: r.syncing ? "copying the live weights now"
            : typeof r.sync_ms === "number" ? `${Math.round(r.sync_ms)} ms` : r.index === 0 ? "the trained replica" : "—"})))))),
      ...replicas.filter((r) => r.last_error).map((r) =>
        h("p", {class: "error-text", text: `Replica ${r.index}: ${r.last_error}`})));
  }

  function renderStatus(s) {
    const losses = Array.isArray(s.losses) ? s.losses : [];
    replace(statusBody,
      h("p", {class: "state-line"}, h("span", {class: `state state-${s.state}`, text: s.state || "unknown"}),
        s.run_id !== null && s.run_id !== undefined ? h("span", {class: "muted", text: ` run ${s.run_id}, step ${s.step ?? 0}`}) : null),
      kvList([
        ["Live weights", `v${s.weight_version ?? "?"}`],
        ["Training share while serving", typeof s.train_share === "number"
          ? (s.train_share >= 1 ? "100 % (never yields)" : `${Math.round(s.train_share * 100)} %`) : "—"],
        ["Pause while writing", s.pause_mode === "keep" ? "keep (answers in flight continue on the new weights)"
          : s.pause_mode === "wait" ? "wait (answers in flight finish first)" : "—"],
        ...(s.pause_mode === "keep" && s.keep_recompute ? [["Next write waits for preempted answers",
          s.keep_recompute.share >= 1 ? "no (writes back to back)"
            : `until their recompute is ≤ ${Math.round(s.keep_recompute.share * 100)} % of serving time`
              + (s.keep_recompute.recovering ? " — recovering now"
                : s.keep_recompute.holding_s > 0 ? ` — holding ${fmtNum(s.keep_recompute.holding_s, 1)} s` : "")
              + (typeof s.keep_recompute.last_recompute_s === "number"
                ? ` (last recompute ${fmtNum(s.keep_recompute.last_recompute_s, 2)} s)` : "")]] : []),
        ["Last loss", losses.length ? fmtNum(losses[losses.length - 1], 4) : "—"],
        ...Object.entries(s.metrics || {}).slice(0, 6).map(([k, v]) => [k, fmtNum(v, 4)]),
      ]),
      s.held_paused ? h("p", {class: "error-text", text: `vLLM is held paused: ${s.held_paused}`}) : null,
      s.last_error ? h("p", {class: "error-text", text: `Last error: ${s.last_error}`}) : null);
    renderLiveLoss(s.run_id, losses);
  }

  /** Loss per step of the current (or last) run, straight from the trainer; redrawn only when it changes. */
  function renderLiveLoss(runId, losses) {
    const key = JSON.stringify([runId, losses.length]);
    if (key === live.key) return;
    live.key = key;
    if (live.chart) live.chart.destroy();
    live.chart = null;
    replace(liveChart);
    if (!losses.length) return;
    const box = h("figure", {class: "chart", dataset: {metric: "live-loss"}}, h("figcaption", {text: `Run ${runId}: loss per step`}));
    liveChart.append(box);
    live.chart = runChart(box, "loss", losses.map((_, i) => i + 1), losses);
  }

  function renderStats(s) {
    replace(statsBody, kvList([
      ["Responses", fmtNum(s.responses_total)],
      ["Ratings", fmtNum(s.ratings_total)],
      ["Comparisons", fmtNum(s.comparisons_total)],
      ["Pairs not yet trained", `${fmtNum(s.untrained_pairs)} of ${fmtNum(s.pairs_available)}`],
      ["Thumbs not yet trained", `${fmtNum(s.untrained_unpaired)} of ${fmtNum(s.unpaired_available)}`],
      ...(s.fresh === false ? [["Counted at", `${fmtTime(s.as_of)} (being recounted)`]] : []),
    ]));
  }

  function renderSched(s) {
    const paused = Boolean(s.paused) || s.state === "paused";
    const pairs = Object.entries(s).filter(([k, v]) => k !== "paused_reason" && (v === null || ["string", "number", "boolean"].includes(typeof v)))
      .slice(0, 10).map(([k, v]) => [k.replace(/_/g, " "), typeof v === "string" && /\d{4}-\d\d-\d\dT/.test(v) ? fmtTime(v) : fmtNum(v)]);
    replace(schedBody, kvList(pairs),
      paused && s.paused_reason ? h("p", {class: "error-text paused-reason", text: s.paused_reason}) : null,
      h("div", {class: "form-actions"},
        h("button", {type: "button", class: "btn", text: paused ? "Resume" : "Pause",
          onclick: () => admin(`/api/scheduler/${paused ? "resume" : "pause"}`, {}, paused ? "Scheduler resumed." : "Scheduler paused.", loadSched, schedStatus)}),
        paused ? null : h("button", {type: "button", class: "btn", text: "Train now",
          title: "Start a run on the feedback not trained yet, without waiting for the thresholds",
          onclick: () => admin("/api/scheduler/run", {}, "Run requested.", async () => { followNewest = true; await Promise.all([loadSched(), loadRuns()]); }, schedStatus)})),
      schedStatus);
  }

  function renderRuns(data) {
    const runs = Array.isArray(data) ? data : (data.items || []);
    if (!runs.length) {
      replace(runsBody, empty("No training runs yet. Rate some answers, then train (or let the scheduler do it)."));
      replace(chartBody);
      return;
    }
    if (selectedRun === null || followNewest) selectedRun = runs[0].id ?? runs[0].run_id;
    const rows = runs.map((r) => {
      const id = r.id ?? r.run_id;
      const select = h("button", {type: "button", class: "btn small ghost", text: `Run ${id}`,
        "aria-pressed": String(String(id) === String(selectedRun)), onclick: () => { selectedRun = id; followNewest = false; renderRuns(data); }});
      const acc = r.accuracy_before !== null && r.accuracy_before !== undefined
        ? `${fmtNum(r.accuracy_before, 3)} → ${fmtNum(r.accuracy_after, 3)}` : "—";
      return h("tr", {dataset: {runId: String(id)}, class: `run-${r.status || ""}`},
        h("td", {}, select),
        h("td", {text: r.status || r.state || "—", title: r.error || r.reason || ""}),
        h("td", {text: [r.objective, r.trigger].filter(Boolean).join(" · ") || "—"}),
        h("td", {text: fmtTime(r.created_at || r.started_at)}),
        h("td", {text: r.size ?? "—"}),
        h("td", {text: `v${r.version_before ?? "?"} → ${r.version_after !== null && r.version_after !== undefined ? `v${r.version_after}` : "…"}`}),
        h("td", {text: fmtNum(r.loss ?? (r.metrics || {}).loss, 4)}),
        h("td", {text: acc}));
    });
    replace(runsBody, h("div", {class: "table-wrap"}, h("table", {class: "runs"},
      h("thead", {}, h("tr", {}, ["Run", "Status", "Objective", "Started", "Batch", "Weights", "Loss", "Eval accuracy"].map((t) => h("th", {scope: "col", text: t})))),
      h("tbody", {}, rows))));
    loadRunChart(selectedRun);
  }

  let chartKey = "";
  async function loadRunChart(id) {
    try {
      const run = await api(`/api/runs/${encodeURIComponent(id)}`);
      if (disposed) return;
      const series = metricSeries(run.history || []);
      const key = JSON.stringify([id, series.steps.length, series.steps[series.steps.length - 1]]);
      if (key === chartKey) return; // nothing new: keep the charts (and the reader's hover) as they are
      chartKey = key;
      for (const c of charts.splice(0)) c.destroy();
      if (!series.steps.length) {
        replace(chartBody, empty(`Run ${id} has no steps recorded yet.`));
        return;
      }
      const screen = (run.metrics || {}).screen;
      replace(chartBody, h("h3", {text: `Run ${id}, per step`}),
        run.error || run.rollback_reason ? h("p", {class: "error-text run-note",
          text: run.rolled_back ? `Rolled back: ${run.rollback_reason || run.error}` : `Run ${run.status}: ${run.error}`}) : null,
        screen ? h("p", {class: "muted run-screen", text: screenLine(screen)}) : null);
      for (const [name, values] of series.metrics) {
        const box = h("figure", {class: "chart", dataset: {metric: name}}, h("figcaption", {text: name}));
        chartBody.append(box);
        charts.push(runChart(box, name, series.steps, values));
      }
    } catch (err) {
      if (!disposed) replace(chartBody, h("p", {class: "error-text", text: `Run ${id}: ${err.message}`}));
    }
  }

  function renderVersions(data) {
    const items = [...(data.items || [])].sort((a, b) => b.version - a.version);
    if (!items.length) {
      replace(versionsBody, empty("No weight versions recorded."));
      return;
    }
    replace(versionsBody, versionTrend, h("ol", {class: "timeline"}, items.map((v) => {
      const live = v.version === data.live;
      const evalPairs = [...(typeof v.run_loss === "number" ? [["train loss", fmtNum(v.run_loss, 4)]] : []),
        ...evalFigures(v.eval)];
      return h("li", {class: `tl-item${live ? " live" : ""}`, dataset: {version: String(v.version)}},
        h("div", {class: "tl-head"},
          h("strong", {text: `v${v.version}`}),
          live ? h("span", {class: "badge up", text: "live"}) : null,
          h("span", {class: "badge", text: v.kind || "?"}),
          v.status && v.status !== "live" ? h("span", {class: "badge muted", text: v.status}) : null,
          h("time", {class: "muted", datetime: v.created_at, text: fmtTime(v.created_at)})),
        h("div", {class: "tl-meta muted", text: [
          v.parent_version !== null && v.parent_version !== undefined ? `from v${v.parent_version}` : "",
          v.run_id !== null && v.run_id !== undefined ? `run ${v.run_id}` : "",
          v.note || ""].filter(Boolean).join(" · ")}),
        evalPairs.length ? h("div", {class: "evals"}, evalPairs.map(([k, val]) => h("span", {class: "chip", text: `${k} ${val}`}))) : null,
        v.checkpoint_path && !live ? h("button", {type: "button", class: "btn small", text: `Restore v${v.version}`,
          onclick: () => restore(v.version)}) : null,
        v.checkpoint_path ? h("small", {class: "muted path", text: v.checkpoint_path}) : null);
    })));
    renderEvalTrend(items); // after versionTrend is in the page, so the charts get its width
  }

  /** The cross-run view: per weight version, the training loss of the run that made it (`run_loss`: its last step),
   * held-out accuracy and canary perplexity, when at least two versions have one of them. Versions missing a figure
   * (the initial weights have no run, a checkpoint no eval) leave a gap in that chart. */
  function renderEvalTrend(items) {
    const points = [...items].reverse().filter((v) => TREND.some(([, pick]) => typeof pick(v) === "number"));
    const key = JSON.stringify(points.map((v) => [v.version, ...TREND.map(([, pick]) => pick(v) ?? null)]));
    if (key === trend.key) return;
    trend.key = key;
    for (const c of trend.charts.splice(0)) c.destroy();
    replace(versionTrend);
    if (points.length < 2) return;
    versionTrend.append(h("h3", {text: "By weight version"}));
    const xs = points.map((v) => v.version);
    for (const [name, pick] of TREND) {
      const ys = points.map((v) => (typeof pick(v) === "number" ? pick(v) : null));
      if (ys.every((y) => y === null)) continue;
      const box = h("figure", {class: "chart", dataset: {metric: name}}, h("figcaption", {text: `${name} by version`}));
      versionTrend.append(box);
      trend.charts.push(runChart(box, name, xs, ys, "version"));
    }
  }

  async function loadRaters() {
    if (!adminToken()) {
      replace(ratersBody, empty("Enter the admin token above to see and manage rater accounts."));
      return null;
    }
    try {
      const data = await api("/api/raters", {admin: true});
      if (!disposed) renderRaters(data);
      return data;
    } catch (err) {
      if (!disposed) replace(ratersBody, h("p", {class: "error-text", text: `Rater accounts: ${err.message}`}));
      return null;
    }
  }

  function renderRaters(data) {
    const raters = data.raters || [];
    if (!raters.length) {
      replace(ratersBody, empty("No accounts yet: anyone may rate under a name they type (on this machine only)."));
      return;
    }
    replace(ratersBody, h("div", {class: "table-wrap"}, h("table", {class: "raters"},
      h("thead", {}, h("tr", {}, ["Name", "Role", "State", "Since", ""].map((t) => h("th", {scope: "col", text: t})))),
      h("tbody", {}, raters.map((r) => h("tr", {dataset: {rater: r.name}, class: r.active ? "" : "revoked"},
        h("td", {text: r.name}), h("td", {text: r.role}),
        h("td", {text: r.active ? "active" : `revoked ${fmtTime(r.revoked_at)}`}), h("td", {text: fmtTime(r.created_at)}),
        h("td", {}, r.active ? h("div", {class: "row-actions"},
          h("button", {type: "button", class: "btn small ghost", text: "New token", "aria-label": `New token for ${r.name}`,
            onclick: () => reissue(r.name)}),
          h("button", {type: "button", class: "btn small ghost", text: "Revoke", "aria-label": `Revoke ${r.name}`,
            onclick: () => revoke(r.name)})) : null)))))));
  }

  function showToken(made) {
    const code = h("code", {class: "token", text: made.token});
    replace(newTokenBox, h("p", {}, h("strong", {text: `${made.name}'s token`}), " (shown only now; give it to them, they sign in with it):"),
      code, h("button", {type: "button", class: "btn small ghost", text: "Copy", onclick: async () => {
        try { await navigator.clipboard.writeText(made.token); setStatus(raterStatus, "Token copied.", "ok"); }
        catch { window.getSelection().selectAllChildren(code); setStatus(raterStatus, "Selected: copy it with Ctrl+C.", "ok"); }
      }}));
    newTokenBox.hidden = false;
  }

  async function revoke(name) {
    if (!(await dialog.ask(`Revoke ${name}? Their token stops working at once; their ratings stay theirs.`, "Revoke"))) return;
    newTokenBox.hidden = true;
    await admin(`/api/raters/${encodeURIComponent(name)}/revoke`, {}, `${name} revoked.`, loadRaters, raterStatus);
  }

  async function reissue(name) {
    if (!(await dialog.ask(`Give ${name} a new token? The old one stops working.`, "New token"))) return;
    const made = await admin(`/api/raters/${encodeURIComponent(name)}/token`, {}, `New token for ${name}.`, loadRaters, raterStatus);
    if (made) showToken(made);
  }

  function renderQuarantine(data) {
    const items = data.items || [];
    if (!items.length) {
      replace(quarantineBody, empty("Nothing held back. Feedback that pulls against what the model has learned is held here before training."));
      return;
    }
    replace(quarantineBody, h("ul", {class: "quarantine"}, items.map((q) => h("li", {dataset: {quarantine: String(q.id)}},
      h("div", {class: "tl-head"},
        h("strong", {text: q.scope === "batch" ? "Whole batch" : q.scope.replace(/^rater:/, "Rater ")}),
        h("span", {class: "badge", text: `${q.n_items} items`}),
        h("span", {class: "muted", text: `run ${q.run_id} · ${fmtTime(q.created_at)}`})),
      h("p", {text: q.reason}),
      h("details", {}, h("summary", {text: "Evidence"}), h("div", {class: "table-wrap"}, h("table", {},
        h("thead", {}, h("tr", {}, ["Rater", "Item", "Contribution", "Feedback"].map((t) => h("th", {scope: "col", text: t})))),
        h("tbody", {}, ((q.evidence || {}).items || []).map((it) => h("tr", {},
          h("td", {text: it.group}), h("td", {text: itemKind(it)}), h("td", {text: fmtNum(it.contribution, 4)}),
          h("td", {text: [...(it.comparison_ids || []).map((c) => `comparison ${c}`), ...(it.rating_ids || []).map((r) => `rating ${r}`)].join(", ")}))))))),
      h("div", {class: "form-actions"},
        h("button", {type: "button", class: "btn small", text: "Re-queue",
          title: "Give this feedback back to the queue: a later batch trains on it (screened again)",
          onclick: () => decide(q, "requeue")}),
        h("button", {type: "button", class: "btn small ghost", text: "Drop",
          title: "Keep this feedback out of training for good", onclick: () => decide(q, "drop")}))))));
  }

  function renderSignal(data) {
    const raters = data.raters || [];
    if (!raters.length) { replace(signalBody); return; }
    replace(signalBody, h("h3", {text: "Rater signal"}),
      h("p", {class: "muted", text: `Over the screens of the last ${data.runs} scheduled runs: how each rater's feedback pulls along what the model has learned. Flagged: p < ${data.alpha}.`}),
      h("div", {class: "table-wrap"}, h("table", {class: "signal"},
        h("thead", {}, h("tr", {}, ["Rater", "Items", "Pulled back", "p", "Quarantined", ""].map((t) => h("th", {scope: "col", text: t})))),
        h("tbody", {}, raters.map((r) => h("tr", {class: r.flagged ? "flagged" : ""},
          h("td", {text: r.rater}), h("td", {text: r.items}), h("td", {text: r.down}), h("td", {text: fmtNum(r.p_value, 3)}),
          h("td", {text: r.quarantined}), h("td", {text: r.flagged ? "flagged" : ""})))))));
  }

  async function decide(q, action) {
    const what = action === "requeue" ? "Give this feedback back to the queue? A later batch trains on it (screened again)."
      : "Drop this feedback for good? It will never be trained on.";
    if (!(await dialog.ask(what, action === "requeue" ? "Re-queue" : "Drop"))) return;
    admin(`/api/quarantine/${q.id}/${action}`, {}, (r) => `Quarantined batch ${r.id} ${r.state}.`,
      async () => { await Promise.all([loadQuarantine(), loadSched()]); }, quarantineStatus);
  }

  // --- admin actions
  async function admin(path, body, okText, after, line = actionStatus) {
    clearError();
    setStatus(line, "Working…", "busy");
    try {
      const result = await api(path, {method: "POST", body, admin: true});
      setStatus(line, typeof okText === "function" ? okText(result) : okText, "ok");
      if (after) await after();
      line.scrollIntoView({block: "nearest"});  // the button may be far down a long list: show what happened
      return result;
    } catch (err) {
      setStatus(line, "");
      const hint = err.status === 401 || err.status === 403 ? " Enter the admin token at the top of this page." : "";
      showError(isMissingRoute(err) ? `${path} is not available on this server.` : `${err.message}${hint}`,
        {retry: () => admin(path, body, okText, after, line)});
      return null;
    }
  }

  async function checkpoint() {
    if (!(await dialog.ask("Write a checkpoint of the live weights now?", "Checkpoint"))) return;
    admin("/api/checkpoint", {}, (r) => `Checkpoint v${r.version} written.`, loadVersions);
  }

  async function restore(version) {
    const ok = await dialog.ask(`Restore weights v${version}? The live model is replaced in place; ` +
      "answers after this come from the restored weights (a new version number records it).", `Restore v${version}`);
    if (!ok) return;
    admin(`/api/versions/${version}/restore`, {}, (r) => `Restored v${r.restored_from} as v${r.version}.`,
      async () => { await loadVersions(); refreshHealth(); });
  }

  // --- refresh: the trainer and scheduler cards are the heartbeat; the other cards follow what it sees change
  let beatKey = null;
  let detailsKey = null;
  const details = poller(async () => {
    const got = await Promise.all([loadStats(), loadRuns(), loadVersions(), loadQuarantine()]);
    const key = JSON.stringify(got);
    const changed = key !== detailsKey || (got[0] && got[0].fresh === false); // a recount is due: ask again soon
    detailsKey = key;
    return {changed};
  }, {interval: 10000, max: 60000});
  const beat = poller(async () => {
    const [st, sc, reps] = await Promise.all([loadStatus(), loadSched(), loadReplicas()]);
    const busy = BUSY_STATES.has(st && st.state) || (sc && sc.state) === "training";
    const progress = [st ? [st.step, (st.losses || []).length, st.held_paused, st.last_error] : null, reps];
    const events = JSON.stringify([st && [st.state, st.run_id, st.weight_version],
      sc && [sc.state, sc.paused, sc.running_run_id, sc.untrained, sc.last_run_id, sc.last_error]]);
    if (beatKey !== null && events !== beatKey.events) details.now(); // a run began or ended, feedback came in
    const changed = beatKey === null || events !== beatKey.events || JSON.stringify(progress) !== beatKey.progress;
    beatKey = {events, progress: JSON.stringify(progress)};
    return {changed, busy};
  }, {interval: 4000, max: 12000, fast: 2000});
  const onResize = () => { for (const c of [...charts, ...trend.charts]) c.fit(); if (live.chart) live.chart.fit(); };
  window.addEventListener("resize", onResize);
  loadRaters();  // accounts change rarely: on mount and after each action, not on a timer

  return () => {
    disposed = true;
    beat.stop();
    details.stop();
    window.removeEventListener("resize", onResize);
    for (const c of charts.splice(0)) c.destroy();
    if (live.chart) live.chart.destroy();
    for (const c of trend.charts.splice(0)) c.destroy();
  };
}

/** A modal <dialog> (focus is trapped and restored by the browser); ask() resolves true on Confirm. */
function confirmDialog() {
  const text = h("p", {id: "confirm-text"});
  const confirmBtn = h("button", {type: "submit", class: "btn danger", value: "yes", text: "Confirm"});
  const el = h("dialog", {class: "confirm", "aria-labelledby": "confirm-title", "aria-describedby": "confirm-text"},
    h("form", {method: "dialog"},
      h("h2", {id: "confirm-title", text: "Are you sure?"}), text,
      h("div", {class: "form-actions"},
        h("button", {type: "submit", class: "btn ghost", value: "no", text: "Cancel"}), confirmBtn)));
  return {
    el,
    ask(message, action) {
      text.textContent = message;
      confirmBtn.textContent = action;
      el.returnValue = "";
      el.showModal();
      return new Promise((resolve) => el.addEventListener("close", () => resolve(el.returnValue === "yes"), {once: true}));
    },
  };
}

/** What a screened item was: a pair, or a thumb (in the batch, or a waiting one measured beside it). */
function itemKind(it) {
  if (it.thumb !== 1 && it.thumb !== -1) return "pair";
  return `thumb ${it.thumb === 1 ? "up" : "down"}${it.companion ? " (waiting, beside the batch)" : ""}`;
}

const DIRECTION_NAMES = {
  learned: "the weights' change since the base",
  anchors: "the eval pairs' gradient",
  both: "the weights' change and the eval pairs' gradient",
};

/** One line on a run's screen: its test, the direction it was measured along, and what it held back. */
function screenLine(screen) {
  if (screen.p_value === null || screen.p_value === undefined) return `Screen: ${screen.note || "nothing measured"}.`;
  const held = screen.quarantined ? `${screen.quarantined} of ${screen.n} items quarantined` : `nothing held back of ${screen.n} items`;
  const beside = screen.companions ? ` (${screen.companions} of them waiting thumbs measured beside the batch)` : "";
  const by = screen.p_by_direction || {};
  const along = Object.entries(by).filter(([, p]) => typeof p === "number").map(([d, p]) => `${d} ${fmtNum(p, 3)}`);
  const directions = screen.direction
    ? ` Along ${DIRECTION_NAMES[screen.direction] || screen.direction}${along.length ? ` (p by direction: ${along.join(", ")})` : ""}${screen.n_anchors ? `, ${screen.n_anchors} anchor pairs` : ""}.`
    : "";
  return `Screen: p ${fmtNum(screen.p_value, 3)} at level ${screen.alpha}; ${held}${beside}.${directions}`;
}

/** The figures of the by-version view: [name, pick from a /api/versions item]. */
const TREND = [
  ["training loss", (v) => v.run_loss],
  ["eval accuracy", (v) => (v.eval || {}).accuracy],
  ["canary perplexity", (v) => (v.eval || {}).canary_perplexity],
];

const EVAL_LABELS = {accuracy: "accuracy", mean_margin: "margin", canary_perplexity: "perplexity", n_pairs: "pairs"};

/** The eval figures worth a glance, as [label, text]; bookkeeping fields (timings, ids, timestamps) left out.
 * After a scheduled run they include the drift from the base model and the canary answers' health. */
function evalFigures(evalData) {
  if (!evalData || typeof evalData !== "object") return [];
  const out = Object.entries(EVAL_LABELS)
    .filter(([k]) => typeof evalData[k] === "number")
    .map(([k, label]) => [label, fmtNum(evalData[k], 4)]);
  const drift = evalData.drift || {};
  if (typeof drift.kl_per_token === "number") out.push(["KL vs base", fmtNum(drift.kl_per_token, 4)]);
  if (typeof drift.perplexity_vs_base === "number") out.push(["perplexity vs base", `${(drift.perplexity_vs_base * 100).toFixed(1)} %`]);
  const health = evalData.health || {};
  for (const [k, label] of [["stutter_rate", "stutter"], ["collapse_share", "same opening"], ["unfinished_rate", "unfinished"]]) {
    if (typeof health[k] === "number") out.push([label, `${Math.round(health[k] * 100)} %`]);
  }
  return out;
}

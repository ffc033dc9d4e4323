/**
 * charts.js — per-step training charts on top of the vendored uPlot (global `uPlot`, see web/vendor/uplot).
 *
 * `metricSeries(history)` turns a run's `history` (a list of per-step records, or columns of arrays) into
 * {steps, metrics: [[name, values]]}, picking loss, reward accuracy and margin first, then any other numeric
 * field, so a new metric in the worker shows up without a UI change. `runChart(el, ...)` draws one of them, with a
 * readout line under it: the value of the point under the cursor ("step 12 · loss 0.4321"), or the last point when
 * the cursor is elsewhere. The chart takes keyboard focus; the arrow keys (Home, End) walk the points.
 */

import {fmtNum} from "./dom.js";

const PREFERRED = [/^loss$/, /loss/, /acc/, /^reward_margin$/, /margin/, /reward/, /kl/];
const SKIP = new Set(["step", "time", "timestamp", "created_at", "t", "run_id", "elapsed_s"]);

function toRows(history) {
  if (Array.isArray(history)) return history.filter((r) => r && typeof r === "object");
  if (history && typeof history === "object") {
    // Columnar: {step: [...], loss: [...]} → rows.
    const keys = Object.keys(history).filter((k) => Array.isArray(history[k]));
    const n = Math.max(0, ...keys.map((k) => history[k].length));
    return Array.from({length: n}, (_, i) => Object.fromEntries(keys.map((k) => [k, history[k][i]])));
  }
  return [];
}

function flatten(row) {
  // Metrics may be nested one level ({step, metrics: {loss, ...}}).
  const out = {...row};
  for (const [k, v] of Object.entries(row)) {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      Object.assign(out, v);
      delete out[k];
    }
  }
  return out;
}

export function metricSeries(history) {
  const rows = toRows(history).map(flatten);
  const steps = rows.map((r, i) => (typeof r.step === "number" ? r.step : i + 1));
  const names = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (!SKIP.has(k) && !k.endsWith("_ms") && typeof v === "number") names.add(k);
  const rank = (name) => {
    const i = PREFERRED.findIndex((re) => re.test(name));
    return i < 0 ? PREFERRED.length : i;
  };
  const ordered = [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b)).slice(0, 6);
  return {steps, metrics: ordered.map((name) => [name, rows.map((r) => (typeof r[name] === "number" ? r[name] : null))])};
}

const COLORS = ["#3b6fd8", "#2f9e6e", "#c0793a", "#8a5cc7", "#c04a6a", "#4a8fa0"];
let colorIndex = 0;

/** Draw one metric against step (or `xLabel`) into `el`; returns an object with fit() and destroy(). */
export function runChart(el, name, steps, values, xLabel = "step") {
  const color = COLORS[colorIndex++ % COLORS.length];
  if (typeof window.uPlot !== "function") {
    el.append(document.createTextNode(`Chart library missing; last ${name}: ${values[values.length - 1]}`));
    return {fit() {}, destroy() {}};
  }
  // One line kept under the chart (its height reserved in CSS), so hovering neither moves the page nor covers the
  // plot, and nothing floats past the card's edge.
  const readout = document.createElement("p");
  readout.className = "chart-readout";
  const lastIdx = values.reduce((last, v, i) => (typeof v === "number" ? i : last), -1);
  const pointText = (i) => `${xLabel} ${fmtNum(steps[i])} · ${name} ${fmtNum(values[i], 4)}`;
  const show = (i) => {
    const hovering = i !== null && i !== undefined && i >= 0;
    readout.textContent = hovering ? pointText(i) : lastIdx >= 0 ? `last: ${pointText(lastIdx)}` : "";
    readout.classList.toggle("hovering", hovering);
  };
  const width = () => Math.max(240, Math.min(el.clientWidth || 320, 900) - 8);
  const plot = new window.uPlot({
    width: width(),
    height: 180,
    legend: {show: false}, // the figure caption names the one series; the readout line gives the values
    cursor: {drag: {x: false, y: false}},
    hooks: {setCursor: [(u) => show(u.cursor.idx)]},
    scales: {x: {time: false}},
    // Steps are whole numbers: only integer ticks on x.
    axes: [{label: xLabel, stroke: "currentColor", grid: {stroke: "rgba(128,128,128,0.15)"},
      incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]},
      {stroke: "currentColor", grid: {stroke: "rgba(128,128,128,0.15)"}, size: 56}],
    series: [{label: xLabel}, {label: name, stroke: color, width: 2, points: {show: steps.length < 40}}],
  }, [steps, values], el);
  el.append(readout);
  show(null);

  // Keyboard: the chart is one tab stop; the arrow keys move the cursor point by point, the readout follows.
  const root = plot.root;
  root.tabIndex = 0;
  root.setAttribute("role", "img");
  root.setAttribute("aria-label", `${name} by ${xLabel}; arrow keys read the values`);
  const moveTo = (i) => {
    const y = typeof values[i] === "number" ? values[i] : plot.scales.y.min;
    plot.setCursor({left: plot.valToPos(steps[i], "x"), top: plot.valToPos(y, "y")});
  };
  const onKey = (e) => {
    if (!steps.length) return;
    const at = plot.cursor.idx ?? lastIdx;
    const to = {ArrowLeft: at - 1, ArrowDown: at - 1, ArrowRight: at + 1, ArrowUp: at + 1,
      Home: 0, End: steps.length - 1}[e.key];
    if (to === undefined) return;
    e.preventDefault();
    moveTo(Math.max(0, Math.min(steps.length - 1, to)));
  };
  const onFocus = () => {
    readout.setAttribute("aria-live", "polite"); // announced while the keyboard reads it, not on every mouse move
    if (plot.cursor.idx === null || plot.cursor.idx === undefined) moveTo(Math.max(0, lastIdx));
  };
  const onBlur = () => {
    readout.removeAttribute("aria-live");
    plot.setCursor({left: -10, top: -10}); // uPlot's "no cursor": the readout goes back to the last point
  };
  root.addEventListener("keydown", onKey);
  root.addEventListener("focus", onFocus);
  root.addEventListener("blur", onBlur);

  // Charts are drawn as their figures join a grid that re-flows as more arrive (one figure spans the row until the
  // next one lands): follow the figure's own width, not the width it had when drawn.
  let drawn = width();
  const fit = () => {
    const now = width();
    if (now !== drawn) plot.setSize({width: (drawn = now), height: 180});
  };
  const watch = typeof ResizeObserver === "function" ? new ResizeObserver(fit) : null;
  if (watch) watch.observe(el);
  return {
    fit,
    destroy() {
      if (watch) watch.disconnect();
      plot.destroy();
      readout.remove();
    },
  };
}

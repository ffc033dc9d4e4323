/**
 * poll.js — polling that stays cheap for the server.
 *
 * A poller runs one round at a time (the next is scheduled when the previous has answered, so requests never
 * pile up behind a slow one), only while the page is visible (a hidden tab asks for nothing and catches up at
 * once when shown again), and backs off while nothing changes: the wait doubles from `interval` up to `max`,
 * drops back to `interval` when a round reports a change, and stays at `fast` while a round reports work in
 * progress (a training run). Used by the shell's health pill (app.js) and the Training view (training.js).
 */

/**
 * Start polling: `round()` is awaited every wait and resolves to {changed, busy} (both optional). The first
 * round runs at once. Returns {now(), stop()}: now() runs a round immediately (after the current one, if any)
 * and resets the wait; stop() ends polling for good.
 */
export function poller(round, {interval, max = interval, fast = interval}) {
  let timer = null;
  let wait = interval;
  let running = false;
  let again = false;
  let stopped = false;

  const visible = () => document.visibilityState !== "hidden";

  function schedule(ms) {
    if (timer !== null) clearTimeout(timer);
    timer = stopped || !visible() ? null : setTimeout(tick, ms);
  }

  async function tick() {
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    let result = {};
    try {
      result = (await round()) || {};
    } catch {
      result = {}; // a failed round shows its own error; it just does not count as a change
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      wait = interval;
      schedule(0);
      return;
    }
    wait = result.busy ? fast : result.changed ? interval : Math.min(max, wait * 2);
    schedule(wait);
  }

  function onVisibility() {
    if (!visible()) {
      schedule(0); // clears the timer: nothing is asked while hidden
    } else if (timer === null && !running) {
      wait = interval;
      schedule(0);
    }
  }

  document.addEventListener("visibilitychange", onVisibility);
  schedule(0);
  return {
    now() {
      wait = interval;
      if (running) again = true;
      else schedule(0);
    },
    stop() {
      stopped = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      document.removeEventListener("visibilitychange", onVisibility);
    },
  };
}

// @ts-check
// DOM helpers shared by the views. Every piece of server data reaches the page through
// textContent / text nodes (see `h`), never through innerHTML.

/** @typedef {import('./api.js').Batch} Batch */

export const POLL_MS = 2000;
export const TERMINAL = new Set(['completed', 'failed', 'expired', 'cancelled']);

/** @param {string} id */
export function $(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing element #${id}`);
  return el;
}

/** @template {HTMLElement} T @param {string} id @param {{new(): T}} type @returns {T} */
export function $as(id, type) {
  const el = $(id);
  if (!(el instanceof type)) throw new Error(`#${id} is not a ${type.name}`);
  return el;
}

/**
 * Builds an element; string children become text nodes, so data is never parsed as markup.
 * @param {string} tag
 * @param {Record<string, string>} [attrs]
 * @param {...(Node|string|null|undefined)} children
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  for (const child of children) if (child != null) el.append(child);
  return el;
}

/** @param {HTMLElement} el @param {boolean} visible */
export function show(el, visible) {
  el.hidden = !visible;
}


let pollTimer = 0;
/** Bumped by every render: a late answer for a view that is gone is dropped. */
let generation = 0;

/** Starts a new view; answers meant for the previous one are ignored from now on. */
export function nextView() {
  generation += 1;
  stopPolling();
  return generation;
}

/** Whether `gen` (from `nextView`/`currentView`) is still the view on screen. @param {number} gen */
export function stillShown(gen) {
  return gen === generation;
}

export function currentView() {
  return generation;
}

export function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = 0;
}

/**
 * Runs `refresh` in POLL_MS, or once the tab is visible again if it is hidden then (a background
 * tab does not poll), unless another view has been shown by then.
 * @param {() => void} refresh
 */
export function pollSoon(refresh) {
  stopPolling();
  const gen = generation;
  const run = () => {
    if (gen === generation) refresh();
  };
  pollTimer = window.setTimeout(() => {
    if (document.hidden) document.addEventListener('visibilitychange', run, { once: true });
    else run();
  }, POLL_MS);
}

/** @param {unknown} error */
export function notify(error) {
  const notice = $('notice');
  notice.textContent = error instanceof Error ? error.message : String(error);
  show(notice, true);
}

export function clearNotice() {
  show($('notice'), false);
}

/** @param {number|null|undefined} seconds */
export function formatTime(seconds) {
  if (seconds == null) return '—';
  return new Date(seconds * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

/** @param {number} seconds */
export function formatDuration(seconds) {
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

/** @param {Batch} batch */
export function counts(batch) {
  const c = batch.request_counts ?? { total: 0, completed: 0, failed: 0 };
  const done = c.completed + c.failed;
  const percent = c.total > 0 ? Math.floor((done * 100) / c.total) : 0;
  return { ...c, done, percent };
}

/** Sets a two-colour progress bar (succeeded, failed) and its ARIA values. @param {HTMLElement} bar @param {Batch} batch */
export function setBar(bar, batch) {
  const c = counts(batch);
  bar.setAttribute('aria-valuenow', String(c.percent));
  bar.setAttribute('aria-valuetext', `${c.done} of ${c.total} done (${c.percent}%), ${c.failed} failed`);
  bar.dataset.status = batch.status;
  const [ok, failed] = /** @type {HTMLElement[]} */ ([...bar.children]);
  const share = (/** @type {number} */ n) => (c.total > 0 ? `${(n * 100) / c.total}%` : '0%');
  ok.style.width = share(c.completed);
  if (failed) failed.style.width = share(c.failed);
}

/** @param {string} status */
export function statusBadge(status) {
  return h('span', { class: `status status-${status.replace(/[^a-z_]/g, '')}` }, status);
}

/** @param {string} id */
export function batchHref(id) {
  return `#/batches/${encodeURIComponent(id)}`;
}

// @ts-check
// The batch page: counts, timeline, errors, the failed rows' codes, downloads, cancel, retry.

import { ApiError, call, callJson, retrySupported } from './api.js';
import {
  $, $as, h, show, notify, clearNotice, pollSoon, currentView, stillShown, formatTime,
  formatDuration, counts, setBar, statusBadge, batchHref, TERMINAL,
} from './ui.js';

/** @typedef {import('./api.js').Batch} Batch */
/** @typedef {import('./api.js').BatchError} BatchError */

/** First `errors.data` entries shown. */
const ERRORS_SHOWN = 10;
/** Most bytes of an error file read to tally the failed rows' codes. */
const FAILED_SCAN_BYTES = 1 << 20;
const CANCELLABLE = new Set(['validating', 'in_progress']);
const TIMELINE = [
  ['created_at', 'Created'],
  ['in_progress_at', 'In progress'],
  ['cancelling_at', 'Cancelling'],
  ['finalizing_at', 'Finalizing'],
  ['completed_at', 'Completed'],
  ['failed_at', 'Failed'],
  ['expired_at', 'Expired'],
  ['cancelled_at', 'Cancelled'],
];

/**
 * The failed-rows tally already read, per error file (a finished batch's file never changes).
 * @type {Map<string, {codes: Map<string, {count: number, example: string}>, lines: number, partial: boolean}>}
 */
const failedTallies = new Map();

/** @param {string} id */
export async function showBatch(id) {
  const gen = currentView();
  const missing = $('batch-missing');
  $('batch-title').textContent = `Batch ${id}`;
  document.title = `Batch ${id} · Sluice console`;
  /** @type {Batch} */
  let batch;
  try {
    batch = await callJson('GET', `/batches/${encodeURIComponent(id)}`);
  } catch (e) {
    if (!stillShown(gen)) return;
    if (e instanceof ApiError && e.status === 404) {
      missing.textContent = `Batch not found: ${id}. It does not exist or belongs to another key.`;
      show(missing, true);
      show($('batch-body'), false);
    } else {
      notify(e);
      pollSoon(() => showBatch(id));
    }
    return;
  }
  if (!stillShown(gen)) return;
  clearNotice();
  show(missing, false);
  renderBatch(batch);
  show($('batch-body'), true);
  if (!TERMINAL.has(batch.status)) pollSoon(() => showBatch(id));
}

/** @param {HTMLElement} list @param {[string, Node|string][]} pairs */
function fillPairs(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([term, value]) => [h('dt', {}, term), h('dd', {}, value)]));
}

/** @param {Batch} batch */
function renderBatch(batch) {
  const c = counts(batch);
  $('batch-status').replaceChildren(statusBadge(batch.status));
  setBar($('batch-bar'), batch);
  fillPairs($('batch-counts'), [
    ['Total', String(c.total)],
    ['Completed', String(c.completed)],
    ['Failed', String(c.failed)],
    ['Remaining', String(Math.max(0, c.total - c.done))],
    ['Progress', `${c.percent}%`],
  ]);
  const metadata = Object.entries(batch.metadata ?? {}).map(([k, v]) => `${k} = ${v}`).join(', ');
  fillPairs($('batch-details'), [
    ['Endpoint', batch.endpoint],
    ['Model', batch.model ?? '—'],
    ['Window', batch.completion_window],
    ['Input file', batch.input_file_id],
    ['Output file', batch.output_file_id ?? '—'],
    ['Error file', batch.error_file_id ?? '—'],
    ['Metadata', metadata || '—'],
    ['Retry of', batch.retry_of ? batchLink(batch.retry_of) : '—'],
    ['Retries', batch.retries?.length ? h('span', {}, ...batch.retries.flatMap((id, i) => [i ? ', ' : null, batchLink(id)])) : '—'],
    ['Tokens', batch.usage?.total_tokens != null ? String(batch.usage.total_tokens) : '—'],
  ]);
  const steps = TIMELINE.filter(([field]) => batch[field] != null).map(([field, label]) => {
    const at = /** @type {number} */ (batch[field]);
    const since = field === 'created_at' ? '' : ` (+${formatDuration(Math.max(0, at - batch.created_at))})`;
    return h('li', { 'data-step': field }, h('span', { class: 'step' }, label),
      h('time', { datetime: new Date(at * 1000).toISOString() }, formatTime(at)), since);
  });
  if (!TERMINAL.has(batch.status) && batch.expires_at != null) {
    steps.push(h('li', { 'data-step': 'expires_at', class: 'future' }, h('span', { class: 'step' }, 'Expires'),
      h('time', { datetime: new Date(batch.expires_at * 1000).toISOString() }, formatTime(batch.expires_at))));
  }
  $('batch-timeline').replaceChildren(...steps);
  renderBatchErrors(batch.errors?.data ?? []);
  renderActions(batch);
  renderFailed(batch);
}

/** @param {string} id */
function batchLink(id) {
  return h('a', { href: batchHref(id) }, id);
}

/** @param {BatchError[]} errors */
function renderBatchErrors(errors) {
  const rows = errors.slice(0, ERRORS_SHOWN).map((e) => h('tr', {},
    h('td', {}, e.line != null ? String(e.line) : '—'), h('td', {}, e.code ?? '—'),
    h('td', {}, e.param ?? '—'), h('td', {}, e.message ?? '')));
  $('errors-rows').replaceChildren(...rows);
  show($('errors-table'), errors.length > 0);
  show($('errors-none'), errors.length === 0);
  const more = $('errors-more');
  more.textContent = `…and ${errors.length - ERRORS_SHOWN} more.`;
  show(more, errors.length > ERRORS_SHOWN);
}

/** @param {Batch} batch */
function renderActions(batch) {
  const output = $as('download-output', HTMLButtonElement);
  const errors = $as('download-errors', HTMLButtonElement);
  output.disabled = !batch.output_file_id;
  errors.disabled = !batch.error_file_id;
  output.onclick = () => download(batch.output_file_id, `${batch.id}-output.jsonl`, output);
  errors.onclick = () => download(batch.error_file_id, `${batch.id}-errors.jsonl`, errors);
  const cancel = $as('batch-cancel', HTMLButtonElement);
  show(cancel, CANCELLABLE.has(batch.status));
  cancel.onclick = () => cancelBatch(batch.id, cancel);
  const retry = $as('batch-retry', HTMLButtonElement);
  show(retry, false);
  // Shown only when the server's OpenAPI document offers the retry (another Batch API may not).
  if (TERMINAL.has(batch.status) && (batch.request_counts?.failed ?? 0) > 0) {
    const gen = currentView();
    retrySupported().then((yes) => { if (yes && stillShown(gen)) show(retry, true); });
    retry.onclick = () => retryBatch(batch.id, retry);
  }
}

/**
 * Fetches a file with the key and hands it to the browser as a download: a plain link could not
 * carry the Authorization header.
 * @param {string|null} fileId @param {string} name @param {HTMLButtonElement} button
 */
async function download(fileId, name, button) {
  if (!fileId) return;
  button.disabled = true;
  try {
    const blob = await (await call('GET', `/files/${encodeURIComponent(fileId)}/content`)).blob();
    const url = URL.createObjectURL(blob);
    const link = h('a', { href: url, download: name, hidden: '' });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (e) {
    notify(e);
  } finally {
    button.disabled = false;
  }
}

/** @param {string} id @param {HTMLButtonElement} button */
async function cancelBatch(id, button) {
  if (!window.confirm(`Cancel batch ${id}? Requests that have not run yet will not run.`)) return;
  button.disabled = true;
  try {
    renderBatch(await callJson('POST', `/batches/${encodeURIComponent(id)}/cancel`));
    pollSoon(() => showBatch(id));
  } catch (e) {
    notify(e);
  } finally {
    button.disabled = false;
  }
}

/**
 * A new batch over the failed, expired and cancelled lines; the page moves to it.
 * @param {string} id @param {HTMLButtonElement} button
 */
async function retryBatch(id, button) {
  button.disabled = true;
  try {
    /** @type {Batch} */
    const created = await callJson('POST', `/batches/${encodeURIComponent(id)}/retry`);
    location.hash = batchHref(created.id);
  } catch (e) {
    notify(e);
  } finally {
    button.disabled = false;
  }
}

/**
 * Tallies the failed rows by code from the start of the error file: `error.code` for rows that
 * never got an HTTP answer, else the HTTP status (and the body's error code when it has one).
 * @param {Batch} batch
 */
async function renderFailed(batch) {
  const status = $('failed-status');
  const table = $('failed-table');
  const failed = batch.request_counts?.failed ?? 0;
  if (!TERMINAL.has(batch.status)) {
    status.textContent = failed > 0
      ? `${failed} failed so far; the codes are read from the error file once the batch has finished.`
      : 'None so far.';
    show(table, false);
    return;
  }
  if (!batch.error_file_id) {
    status.textContent = 'No failed requests.';
    show(table, false);
    return;
  }
  const gen = currentView();
  let tally = failedTallies.get(batch.error_file_id);
  if (!tally) {
    status.textContent = 'Reading the error file…';
    try {
      tally = await tallyErrorFile(batch.error_file_id);
    } catch (e) {
      if (stillShown(gen)) status.textContent = `Could not read the error file: ${e instanceof Error ? e.message : e}`;
      return;
    }
    failedTallies.set(batch.error_file_id, tally);
  }
  if (!stillShown(gen)) return;
  const rows = [...tally.codes.entries()].sort((a, b) => b[1].count - a[1].count).map(([code, t]) =>
    h('tr', { 'data-code': code }, h('td', {}, code), h('td', {}, String(t.count)), h('td', {}, t.example)));
  $('failed-rows').replaceChildren(...rows);
  show(table, rows.length > 0);
  status.textContent = tally.partial
    ? `From the first ${tally.lines.toLocaleString()} rows of the error file (the first ${FAILED_SCAN_BYTES / 1024} KiB).`
    : `${tally.lines.toLocaleString()} rows in the error file.`;
}

/** @param {string} fileId */
async function tallyErrorFile(fileId) {
  const response = await call('GET', `/files/${encodeURIComponent(fileId)}/content`);
  const reader = /** @type {ReadableStream<Uint8Array>} */ (response.body).getReader();
  const decoder = new TextDecoder();
  let text = '';
  let read = 0;
  let partial = false;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    read += value.byteLength;
    text += decoder.decode(value, { stream: true });
    if (read >= FAILED_SCAN_BYTES) {
      partial = true;
      await reader.cancel();
      break;
    }
  }
  const lines = text.split('\n');
  // A capped read ends mid-line; the last piece of a full read is the empty string after '\n'.
  lines.pop();
  /** @type {Map<string, {count: number, example: string}>} */
  const codes = new Map();
  for (const line of lines) {
    let row;
    try { row = JSON.parse(line); } catch { continue; }
    const bodyError = row?.response?.body?.error;
    const code = row?.error?.code
      ?? (row?.response ? `HTTP ${row.response.status_code}${bodyError?.code ? ` ${bodyError.code}` : ''}` : 'unknown');
    const message = row?.error?.message ?? bodyError?.message ?? '';
    const entry = codes.get(code);
    if (entry) entry.count += 1;
    else codes.set(code, { count: 1, example: `${row?.custom_id ?? '?'}: ${String(message).slice(0, 200)}` });
  }
  return { codes, lines: lines.length, partial };
}

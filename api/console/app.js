// @ts-check
// The Sluice web console: plain ES modules, no framework, no build step. This module signs in
// and out, lists batches, creates one, and routes between views (`#/batches`, `#/new`,
// `#/batches/{id}`); the batch page is in batch.js.

import { ApiError, apiKey, keepKey, forgetKey, onUnauthorized, call, callJson, uploadFile } from './api.js';
import { showBatch } from './batch.js';
import {
  $, $as, h, show, notify, clearNotice, pollSoon, nextView, currentView, stillShown, formatTime,
  counts, setBar, statusBadge, batchHref, TERMINAL, POLL_MS,
} from './ui.js';

/** @typedef {import('./api.js').Batch} Batch */

/** Batches per page unless the route says otherwise (`#/batches?limit=5`; the API allows 1–100). */
const PAGE_SIZE = 20;

/** @param {string} [message] shown above the sign-in form */
function signOut(message = '') {
  forgetKey();
  forgetTenantData();
  const error = $('login-error');
  error.textContent = message;
  show(error, message !== '');
  render();
}

/**
 * Empties every view of what the signed-out tenant saw: the views are only hidden, and the next
 * person at this browser signs in with another key.
 */
function forgetTenantData() {
  for (const id of ['batch-rows', 'batch-counts', 'batch-details', 'batch-timeline', 'errors-rows', 'failed-rows']) {
    $(id).replaceChildren();
  }
  for (const id of ['list-status', 'batch-status', 'batch-title', 'batch-missing', 'errors-more', 'failed-status', 'new-error']) {
    $(id).textContent = '';
  }
  show($('batch-body'), false);
  $as('new-form', HTMLFormElement).reset();
  newerPages.length = 0;
  clearNotice();
}

onUnauthorized((error) => signOut(`The server no longer accepts this API key (401): ${error.message}`));

// ---- sign in -------------------------------------------------------------------------------

async function onLogin(/** @type {SubmitEvent} */ event) {
  event.preventDefault();
  const input = $as('login-key', HTMLInputElement);
  const error = $('login-error');
  const key = input.value.trim();
  show(error, false);
  try {
    // Checked before it is kept: a typo gets a message here rather than a broken list.
    await call('GET', '/batches?limit=1', { key });
  } catch (e) {
    error.textContent = e instanceof ApiError && e.status === 401
      ? `This API key was not accepted (401): ${e.message}`
      : `Could not reach the server: ${e instanceof Error ? e.message : e}`;
    show(error, true);
    return;
  }
  input.value = '';
  keepKey(key);
  render();
}

// ---- batch list ----------------------------------------------------------------------------

/** Cursors of the pages before the current one, so "Newer" can go back. */
const newerPages = /** @type {(string|null)[]} */ ([]);

/** The list's position from the route: `#/batches?after=ID&limit=N`. */
function listRoute() {
  const query = new URLSearchParams(location.hash.split('?')[1] ?? '');
  const limit = Number(query.get('limit'));
  return {
    after: query.get('after'),
    limit: Number.isInteger(limit) && limit >= 1 && limit <= 100 ? limit : PAGE_SIZE,
  };
}

/** @param {string|null} after @param {number} limit */
function listHref(after, limit) {
  const query = new URLSearchParams();
  if (after) query.set('after', after);
  if (limit !== PAGE_SIZE) query.set('limit', String(limit));
  const text = query.toString();
  return text ? `#/batches?${text}` : '#/batches';
}

async function showList() {
  const gen = currentView();
  const { after, limit } = listRoute();
  const status = $('list-status');
  let page;
  try {
    const query = new URLSearchParams({ limit: String(limit) });
    if (after) query.set('after', after);
    page = await callJson('GET', `/batches?${query}`);
  } catch (e) {
    if (stillShown(gen)) {
      notify(e);
      pollSoon(showList);
    }
    return;
  }
  if (!stillShown(gen)) return;
  clearNotice();
  /** @type {Batch[]} */
  const batches = page.data ?? [];
  const rows = batches.map((b) => {
    const bar = h('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100',
      'aria-label': `Progress of ${b.id}` }, h('span', { class: 'fill' }), h('span', { class: 'fail' }));
    setBar(bar, b);
    const c = counts(b);
    return h('tr', { 'data-batch-id': b.id },
      h('td', {}, h('a', { href: batchHref(b.id) }, b.id)),
      h('td', {}, statusBadge(b.status)),
      h('td', { class: 'progress' }, bar, h('span', { class: 'muted' }, `${c.done}/${c.total}`,
        c.failed ? ` (${c.failed} failed)` : '')),
      h('td', {}, b.endpoint),
      h('td', {}, formatTime(b.created_at)));
  });
  $('batch-rows').replaceChildren(...rows);
  show($('batch-table'), batches.length > 0);
  show($('list-empty'), batches.length === 0 && !after);
  $as('page-older', HTMLButtonElement).disabled = !page.has_more;
  $as('page-newer', HTMLButtonElement).disabled = !after;
  const running = batches.filter((b) => !TERMINAL.has(b.status)).length;
  status.textContent = running > 0 ? `${running} running; refreshing every ${POLL_MS / 1000} s.` : '';
  if (running > 0) pollSoon(showList);
}

function olderPage() {
  const last = document.querySelector('#batch-rows tr:last-child');
  const id = last?.getAttribute('data-batch-id');
  if (!id) return;
  const { after, limit } = listRoute();
  newerPages.push(after);
  location.hash = listHref(id, limit);
}

/** Back one page; after a reload the cursors are gone, so it goes to the first page. */
function newerPage() {
  location.hash = listHref(newerPages.pop() ?? null, listRoute().limit);
}

// ---- new batch -----------------------------------------------------------------------------

function addMetadataRow(key = '', value = '') {
  const rows = $('meta-rows');
  const n = rows.children.length + 1;
  const row = h('div', { class: 'meta-row' },
    h('input', { 'aria-label': `Metadata key ${n}`, class: 'meta-key', placeholder: 'key', maxlength: '64' }),
    h('input', { 'aria-label': `Metadata value ${n}`, class: 'meta-value', placeholder: 'value', maxlength: '512' }));
  const remove = h('button', { type: 'button', class: 'secondary', 'aria-label': `Remove metadata key ${n}` }, 'Remove');
  remove.addEventListener('click', () => row.remove());
  row.append(remove);
  const [k, v] = row.querySelectorAll('input');
  k.value = key;
  v.value = value;
  rows.append(row);
  k.focus();
}

/** @returns {Record<string,string>|null} */
function readMetadata() {
  /** @type {Record<string,string>} */
  const metadata = {};
  for (const row of $('meta-rows').children) {
    const [k, v] = row.querySelectorAll('input');
    const key = k.value.trim();
    if (key === '' && v.value === '') continue;
    if (key === '') throw new Error('A metadata value has no key.');
    if (key in metadata) throw new Error(`The metadata key "${key}" appears twice.`);
    metadata[key] = v.value;
  }
  return Object.keys(metadata).length > 0 ? metadata : null;
}

async function onCreate(/** @type {SubmitEvent} */ event) {
  event.preventDefault();
  const error = $('new-error');
  const submit = $as('new-submit', HTMLButtonElement);
  const file = $as('new-file', HTMLInputElement).files?.[0];
  show(error, false);
  if (!file) return;
  submit.disabled = true;
  const bar = $('upload-bar');
  const text = $('upload-text');
  const setUpload = (/** @type {number} */ percent) => {
    bar.setAttribute('aria-valuenow', String(percent));
    /** @type {HTMLElement} */ (bar.firstElementChild).style.width = `${percent}%`;
  };
  setUpload(0);
  text.textContent = '';
  show($('upload'), true);
  try {
    const metadata = readMetadata();
    const uploaded = await uploadFile(file, (sent, total) => {
      const percent = total > 0 ? Math.floor((sent * 100) / total) : 100;
      setUpload(percent);
      text.textContent = `${percent}% of ${file.size.toLocaleString()} bytes`;
    });
    text.textContent = `Uploaded as ${uploaded.id}; creating the batch…`;
    /** @type {Record<string, unknown>} */
    const body = {
      input_file_id: uploaded.id,
      endpoint: $as('new-endpoint', HTMLSelectElement).value,
      completion_window: $as('new-window', HTMLInputElement).value.trim(),
    };
    if (metadata) body.metadata = metadata;
    /** @type {Batch} */
    const batch = await callJson('POST', '/batches', { json: body });
    $as('new-form', HTMLFormElement).reset();
      show($('upload'), false);
    location.hash = batchHref(batch.id);
  } catch (e) {
    error.textContent = e instanceof ApiError && e.param
      ? `${e.message} (${e.param})`
      : e instanceof Error ? e.message : String(e);
    show(error, true);
  } finally {
    submit.disabled = false;
  }
}

// ---- routing -------------------------------------------------------------------------------

/** @param {string} view */
const TITLES = { login: 'Sign in', list: 'Batches', new: 'New batch', batch: 'Batch' };

/** Shows one view and names it in the title, which screen readers announce. @param {keyof TITLES} view */
function showView(view) {
  for (const name of Object.keys(TITLES)) show($(`view-${name}`), name === view);
  document.title = `${TITLES[view]} · Sluice console`;
}

function render() {
  nextView();
  clearNotice();
  const key = apiKey();
  show($('nav'), key !== null);
  show($('who'), key !== null);
  if (key === null) {
    showView('login');
    $as('login-key', HTMLInputElement).focus();
    return;
  }
  $('who-key').textContent = `Key …${key.slice(-4)}`;
  const route = location.hash.replace(/^#\/?/, '');
  const batch = /^batches\/([^/?]+)$/.exec(route);
  if (batch) {
    showView('batch');
    show($('batch-body'), false);
    show($('batch-missing'), false);
    showBatch(decodeURIComponent(batch[1]));
  } else if (route === 'new') {
    showView('new');
  } else {
    showView('list');
    showList();
  }
}

function start() {
  $as('login-form', HTMLFormElement).addEventListener('submit', onLogin);
  $as('new-form', HTMLFormElement).addEventListener('submit', onCreate);
  $('meta-add').addEventListener('click', () => addMetadataRow());
  $('sign-out').addEventListener('click', () => signOut());
  $('page-older').addEventListener('click', olderPage);
  $('page-newer').addEventListener('click', newerPage);
  window.addEventListener('hashchange', render);
  render();
}

start();

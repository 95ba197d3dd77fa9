// @ts-check
// Talking to the /v1 API with the tenant's key: fetch for JSON, XMLHttpRequest where upload
// progress is wanted. The key lives in sessionStorage only (gone with the tab).

const API = '/v1';
const KEY_ITEM = 'sluice.apiKey';

/**
 * @typedef {{total: number, completed: number, failed: number}} Counts
 * @typedef {{code?: string|null, message?: string|null, param?: string|null, line?: number|null}} BatchError
 * @typedef {{id: string, status: string, endpoint: string, model?: string|null,
 *   completion_window: string, input_file_id: string, output_file_id: string|null,
 *   error_file_id: string|null, request_counts: Counts|null, metadata: Record<string,string>|null,
 *   errors: {data: BatchError[]}|null, usage?: {total_tokens?: number}|null,
 *   created_at: number, expires_at?: number|null, retry_of?: string, retries?: string[]}
 *   & Record<string, any>} Batch
 */

export /** An error answered by the API, from its `{"error": {...}}` envelope. */
class ApiError extends Error {
  /** @param {number} status @param {string} message @param {string|null} code @param {string|null} param */
  constructor(status, message, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

/** @param {string} key */
export function keepKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** What to do when the kept key stops working (set by the app: sign out). */
let unauthorized = (/** @type {ApiError} */ _error) => {};

/** @param {(error: ApiError) => void} handler */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** @param {number} status @param {string} text */
function errorFrom(status, text) {
  try {
    const e = JSON.parse(text).error;
    if (e && typeof e.message === 'string') {
      return new ApiError(status, e.message, e.code ?? null, e.param ?? null);
    }
  } catch { /* not an envelope: fall through */ }
  return new ApiError(status, `HTTP ${status}`);
}

/**
 * One API call with the key. A 401 signs the tab out, whatever the view.
 * @param {string} method @param {string} path
 * @param {{json?: unknown, key?: string}} [options]
 * @returns {Promise<Response>}
 */
export async function call(method, path, options = {}) {
  const key = options.key ?? apiKey();
  /** @type {Record<string,string>} */
  const headers = { Authorization: `Bearer ${key ?? ''}` };
  /** @type {RequestInit} */
  const init = { method, headers, cache: 'no-store' };
  if (options.json !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(API + path, init);
  if (!response.ok) {
    const error = errorFrom(response.status, await response.text());
    if (response.status === 401 && options.key === undefined) {
      unauthorized(error);
    }
    throw error;
  }
  return response;
}

/** @param {string} method @param {string} path @param {{json?: unknown, key?: string}} [options] */
export async function callJson(method, path, options) {
  return (await call(method, path, options)).json();
}

/**
 * Uploads a file for batch use, reporting bytes sent (fetch has no upload progress).
 * @param {File} file @param {(sent: number, total: number) => void} onProgress
 * @returns {Promise<{id: string}>}
 */
export function uploadFile(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', `${API}/files`);
    xhr.setRequestHeader('Authorization', `Bearer ${apiKey() ?? ''}`);
    xhr.upload.addEventListener('progress', (e) => {
      if (e.lengthComputable) onProgress(e.loaded, e.total);
    });
    xhr.addEventListener('load', () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1, 1);
        resolve(JSON.parse(xhr.responseText));
      } else {
        const error = errorFrom(xhr.status, xhr.responseText);
        if (xhr.status === 401) unauthorized(error);
        reject(error);
      }
    });
    xhr.addEventListener('error', () => reject(new Error('The upload failed: network error.')));
    const form = new FormData();
    form.append('purpose', 'batch');
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

/** Whether the server offers `POST /v1/batches/{id}/retry`, read once from its OpenAPI document. */
let retryOffered = /** @type {Promise<boolean>|null} */ (null);
export function retrySupported() {
  retryOffered ??= fetch('/openapi.json')
    .then((r) => (r.ok ? r.json() : null))
    .then((/** @type {any} */ doc) => Boolean(doc?.paths?.['/v1/batches/{batch_id}/retry']?.post))
    .catch(() => false);
  return retryOffered;
}

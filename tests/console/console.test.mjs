// Drives the Sluice web console in headless Debian chromium through playwright-core.
// Started by tests/tests/it/console.rs, which runs a real Sluice (mock upstream, two tenants)
// and passes, in the environment:
//   SLUICE_CONSOLE_ROOT   the server's root URL (no /v1)
//   SLUICE_KEY_A/B        the two tenants' API keys
//   SLUICE_FAST_JSONL     requests that finish in a few seconds (a few fail with HTTP 4xx)
//   SLUICE_SLOW_JSONL     requests slow enough to cancel
//   SLUICE_BAD_JSONL      a file that fails validation: line 2 lacks `url`, line 3 is not JSON
//   CONSOLE_SCREENSHOT    where to save the batch page's screenshot
//   CHROMIUM_PATH         the browser (default /usr/bin/chromium)
// Exits non-zero with the failed step's name and the page's console output.

import assert from 'node:assert/strict';
import { readFile, mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { chromium } from 'playwright-core';

const env = (/** @type {string} */ name, fallback = undefined) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const root = env('SLUICE_CONSOLE_ROOT').replace(/\/$/, '');
const keyA = env('SLUICE_KEY_A');
const keyB = env('SLUICE_KEY_B');
const fastPath = env('SLUICE_FAST_JSONL');
const slowPath = env('SLUICE_SLOW_JSONL');
const badPath = env('SLUICE_BAD_JSONL');
const screenshot = env('CONSOLE_SCREENSHOT');
const executablePath = env('CHROMIUM_PATH', '/usr/bin/chromium');
const HOSTILE = '<img src=x onerror="window.__pwned=1">';

/** The fast file's lines and which custom ids the mock upstream will fail (a `mock.status`). */
const fastLines = (await readFile(fastPath, 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
const failing = new Map(fastLines.filter((l) => l.body.mock?.status).map((l) => [l.custom_id, l.body.mock.status]));
const succeeding = fastLines.filter((l) => !failing.has(l.custom_id)).map((l) => l.custom_id);

const browser = await chromium.launch({ executablePath, headless: true });
const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
const page = await context.newPage();
/** Console errors and uncaught exceptions: a CSP violation shows up here. */
const problems = [];
const log = [];
page.on('console', (m) => {
  log.push(`[${m.type()}] ${m.text()}`);
  // The 401 of a wrong key and the 404 of another tenant's batch are expected answers.
  if (m.type() === 'error' && !/Failed to load resource: the server responded with a status of (401|404)/.test(m.text())) {
    problems.push(m.text());
  }
});
page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));

let current = '';
/** @param {string} name @param {() => Promise<void>} body */
async function step(name, body) {
  current = name;
  const started = Date.now();
  await body();
  console.log(`ok - ${name} (${Date.now() - started} ms)`);
}

const bar = () => page.locator('#batch-bar');
const batchStatus = () => page.locator('#batch-status');

/** Waits for the batch page to show one of `statuses`; returns the aria-valuenow samples seen. */
async function watchBatch(statuses, timeoutMs) {
  const samples = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = (await batchStatus().textContent())?.trim() ?? '';
    const now = Number(await bar().getAttribute('aria-valuenow'));
    if (samples.at(-1)?.status !== status || samples.at(-1)?.now !== now) samples.push({ status, now });
    if (statuses.includes(status)) return samples;
    if (Date.now() > deadline) throw new Error(`batch still '${status}' after ${timeoutMs} ms: ${JSON.stringify(samples)}`);
    await page.waitForTimeout(150);
  }
}

/** Uploads `file` through the form and creates a batch; returns its id (from the URL). */
async function createBatch(file, metadata) {
  await page.getByRole('link', { name: 'New batch' }).first().click();
  await page.getByLabel('Requests file').setInputFiles(file);
  await page.getByLabel('Endpoint').selectOption('/v1/chat/completions');
  await page.getByLabel('Completion window').fill('24h');
  for (const [k, v] of Object.entries(metadata)) {
    await page.getByRole('button', { name: 'Add a key' }).click();
    await page.locator('#meta-rows .meta-key').last().fill(k);
    await page.locator('#meta-rows .meta-value').last().fill(v);
  }
  await page.getByRole('button', { name: 'Upload and create' }).click();
  await page.waitForURL(/#\/batches\/batch_/, { timeout: 20_000 });
  return decodeURIComponent(new URL(page.url()).hash.replace('#/batches/', ''));
}

/** Clicks a download button; returns the downloaded file's name and text. */
async function downloadVia(name) {
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name }).click()]);
  const path = await download.path();
  return { file: download.suggestedFilename(), text: await readFile(path, 'utf8') };
}

let fastId = '';
let slowId = '';
let badId = '';
try {
  await step('the assets load under the strict CSP and the sign-in form shows', async () => {
    const response = await page.goto(`${root}/console/`);
    assert.equal(response?.status(), 200);
    assert.match(response?.headers()['content-security-policy'] ?? '', /default-src 'self'/);
    await page.getByLabel('API key').waitFor();
    assert.equal(await page.locator('#view-login').isVisible(), true);
  });

  await step('a wrong key is refused with a clear 401 message', async () => {
    await page.getByLabel('API key').fill('sk-not-a-key');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByText('This API key was not accepted (401)').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });

  await step('tenant A signs in; the key is kept in sessionStorage only', async () => {
    await page.getByLabel('API key').fill(keyA);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('heading', { name: 'Batches' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('sluice.apiKey')), keyA);
    assert.equal(await page.evaluate(() => localStorage.length), 0);
  });

  await step('upload with progress, then create a batch with metadata', async () => {
    fastId = await createBatch(fastPath, { project: 'console-test', note: HOSTILE });
    // Set from the XMLHttpRequest upload events.
    assert.equal(await page.locator('#upload-bar').getAttribute('aria-valuenow'), '100');
  });

  await step('the progress bar moves and reaches 100 %', async () => {
    const samples = await watchBatch(['completed'], 90_000);
    assert.equal(samples.at(-1)?.now, 100, JSON.stringify(samples));
    assert.ok(samples.some((s) => s.now > 0 && s.now < 100), `no partial progress seen: ${JSON.stringify(samples)}`);
    assert.ok(samples.some((s) => s.status === 'in_progress'), JSON.stringify(samples));
    console.log(`  progress seen: ${samples.map((s) => `${s.status} ${s.now}%`).join(' → ')}`);
  });

  await step('the batch page shows counts, timeline, failed codes, metadata as text', async () => {
    const counts = page.locator('#batch-counts');
    const pair = async (term) => counts.locator(`dt:text-is("${term}") + dd`).textContent();
    assert.equal(await pair('Total'), String(fastLines.length));
    assert.equal(await pair('Completed'), String(succeeding.length));
    assert.equal(await pair('Failed'), String(failing.size));
    const steps = await page.locator('#batch-timeline li').evaluateAll((li) => li.map((l) => l.getAttribute('data-step')));
    assert.deepEqual(steps, ['created_at', 'in_progress_at', 'finalizing_at', 'completed_at']);
    await page.locator('#failed-table').waitFor();
    const byCode = new Map();
    for (const status of failing.values()) byCode.set(`HTTP ${status}`, (byCode.get(`HTTP ${status}`) ?? 0) + 1);
    for (const [code, n] of byCode) {
      assert.equal(await page.locator(`#failed-rows tr[data-code="${code}"] td:nth-child(2)`).textContent(), String(n), code);
    }
    assert.equal(await page.locator('#failed-rows tr').count(), byCode.size);
    assert.equal(await page.locator('#errors-none').isVisible(), true);
    const details = page.locator('#batch-details');
    assert.ok((await details.textContent())?.includes(HOSTILE), 'metadata shown as text');
    assert.equal(await details.locator('img').count(), 0);
    assert.equal(await page.evaluate(() => /** @type {any} */ (window).__pwned), undefined);
    assert.equal(await page.getByRole('button', { name: 'Cancel batch' }).isVisible(), false);
    // The server's OpenAPI document offers the retry, and the batch has failed lines.
    await page.getByRole('button', { name: 'Retry failed' }).waitFor();
  });

  await step('screenshot of the batch page', async () => {
    await mkdir(dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot, fullPage: true, animations: 'disabled' });
  });

  await step('download the output and error files', async () => {
    const output = await downloadVia('Download output');
    assert.equal(output.file, `${fastId}-output.jsonl`);
    const rows = output.text.trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(rows.map((r) => r.custom_id).sort(), [...succeeding].sort());
    assert.ok(rows.every((r) => r.response.status_code === 200 && r.response.body.choices), output.text.slice(0, 500));
    const errors = await downloadVia('Download errors');
    assert.equal(errors.file, `${fastId}-errors.jsonl`);
    const failed = errors.text.trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(new Map(failed.map((r) => [r.custom_id, r.response.status_code])), failing);
  });

  await step('the list shows the batch at 100 %', async () => {
    await page.getByRole('link', { name: 'Batches' }).first().click();
    const row = page.locator(`#batch-rows tr[data-batch-id="${fastId}"]`);
    await row.waitFor();
    assert.equal((await row.locator('.status').textContent())?.trim(), 'completed');
    assert.equal(await row.getByRole('progressbar').getAttribute('aria-valuenow'), '100');
  });

  await step('a slow batch is cancelled from its page after a confirm', async () => {
    slowId = await createBatch(slowPath, {});
    await watchBatch(['in_progress'], 30_000);
    let asked = '';
    page.once('dialog', (d) => { asked = d.message(); d.accept(); });
    await page.getByRole('button', { name: 'Cancel batch' }).click();
    const samples = await watchBatch(['cancelled'], 60_000);
    assert.match(asked, /Cancel batch/);
    assert.ok(samples.some((s) => s.status === 'cancelling'), JSON.stringify(samples));
    // The lines that never ran are failed rows with code batch_cancelled.
    const cancelled = Number(await page.locator('#failed-rows tr[data-code="batch_cancelled"] td:nth-child(2)').textContent());
    assert.ok(cancelled > 0, `batch_cancelled rows: ${cancelled}`);
    const steps = await page.locator('#batch-timeline li').evaluateAll((li) => li.map((l) => l.getAttribute('data-step')));
    assert.ok(steps.includes('cancelling_at') && steps.includes('cancelled_at'), String(steps));
  });

  await step('the list pages through `after` and back', async () => {
    await page.goto(`${root}/console/#/batches?limit=1`);
    const shown = () => page.locator('#batch-rows tr').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-batch-id')));
    await page.locator(`#batch-rows tr[data-batch-id="${slowId}"]`).waitFor();
    assert.deepEqual(await shown(), [slowId]);
    assert.equal(await page.getByRole('button', { name: 'Newer' }).isDisabled(), true);
    await page.getByRole('button', { name: 'Older' }).click();
    await page.locator(`#batch-rows tr[data-batch-id="${fastId}"]`).waitFor();
    assert.deepEqual(await shown(), [fastId]);
    assert.equal(await page.getByRole('button', { name: 'Older' }).isDisabled(), true);
    await page.getByRole('button', { name: 'Newer' }).click();
    await page.locator(`#batch-rows tr[data-batch-id="${slowId}"]`).waitFor();
  });

  await step('a batch that fails validation shows its errors.data', async () => {
    badId = await createBatch(badPath, {});
    await watchBatch(['failed'], 30_000);
    const rows = await page.locator('#errors-rows tr').evaluateAll((trs) =>
      trs.map((tr) => [...tr.querySelectorAll('td')].slice(0, 3).map((td) => td.textContent)));
    assert.deepEqual(rows, [['2', 'missing_required_parameter', 'url'], ['3', 'invalid_json_line', '—']], badId);
    assert.equal(await page.getByRole('button', { name: 'Download output' }).isDisabled(), true);
    assert.equal(await page.locator('#failed-status').textContent(), 'No failed requests.');
  });

  await step('retry failed creates a linked batch of the failed lines', async () => {
    await page.goto(`${root}/console/#/batches/${encodeURIComponent(fastId)}`);
    await page.getByRole('button', { name: 'Retry failed' }).click();
    await page.waitForURL((url) => url.hash.startsWith('#/batches/batch_') && !url.hash.includes(fastId), { timeout: 20_000 });
    const retryId = decodeURIComponent(new URL(page.url()).hash.replace('#/batches/', ''));
    const details = page.locator('#batch-details');
    const parentLink = details.locator(`dt:text-is("Retry of") + dd a:text-is("${fastId}")`);
    // Rendered from the new batch's object: the page no longer shows the parent.
    await parentLink.waitFor();
    // The failing lines fail again upstream: the new batch ends with all of them failed.
    await watchBatch(['completed'], 60_000);
    const counts = page.locator('#batch-counts');
    const pair = async (term) => counts.locator(`dt:text-is("${term}") + dd`).textContent();
    assert.equal(await pair('Total'), String(failing.size));
    assert.equal(await pair('Failed'), String(failing.size));
    await parentLink.click();
    await details.locator(`dt:text-is("Retries") + dd a:text-is("${retryId}")`).waitFor();
    // Leave on the page the later steps expect to have been shown last (none of the fast batch).
    await page.goto(`${root}/console/#/batches/${encodeURIComponent(badId)}`);
    // Rendered: its two errors.data rows replace the fast batch's none.
    await page.locator('#errors-rows tr').nth(1).waitFor();
  });

  await step('a key that stops working mid-session signs the tab out with a message', async () => {
    await page.evaluate(() => sessionStorage.setItem('sluice.apiKey', 'sk-revoked'));
    await page.goto(`${root}/console/#/batches`);
    await page.getByText('The server no longer accepts this API key (401)').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });

  await step('tenant B sees none of tenant A\'s batches', async () => {
    await page.getByLabel('API key').fill(keyB);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByText('No batches yet.').waitFor();
    assert.equal(await page.locator('#batch-rows tr').count(), 0);
    assert.equal(await page.getByText(fastId).count(), 0);
  });

  await step('a direct URL to tenant A\'s batch shows not found to tenant B', async () => {
    await page.goto(`${root}/console/#/batches/${encodeURIComponent(fastId)}`);
    await page.getByText('Batch not found').waitFor();
    assert.equal(await page.locator('#batch-body').isVisible(), false);
  });

  await step('sign out clears the key and what the tenant saw', async () => {
    // The page just shown named tenant A's batch id (as "not found"); the views are only hidden.
    assert.ok((await page.content()).includes(fastId));
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('API key').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    assert.equal((await page.content()).includes(fastId), false, 'a signed-out page keeps a batch id');
  });

  assert.deepEqual(problems, [], 'console errors');
  console.log(`console test passed (batches ${fastId}, ${slowId}; screenshot ${screenshot})`);
} catch (error) {
  console.error(`not ok - ${current}\n${error instanceof Error ? error.stack : error}`);
  console.error(`page console:\n${log.join('\n')}`);
  if (problems.length) console.error(`problems:\n${problems.join('\n')}`);
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-failure.png'), fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}

// Drives a running Sluice with the official `openai` Node SDK: upload, create, poll, download,
// list (with auto-pagination), cancel and the SDK's typed errors. Exits non-zero on any mismatch.
// Usage: SLUICE_BASE=http://127.0.0.1:8080/v1 SLUICE_KEY=sk-... SLUICE_MODEL=... node compat.mjs
import assert from 'node:assert/strict';
import OpenAI, { toFile } from 'openai';

const client = new OpenAI({
  apiKey: process.env.SLUICE_KEY,
  baseURL: process.env.SLUICE_BASE,
  maxRetries: 0,
});
const model = process.env.SLUICE_MODEL;
const terminal = ['completed', 'failed', 'expired', 'cancelled'];

const lines = Array.from({ length: 5 }, (_, i) => JSON.stringify({
  custom_id: `node-${i}`,
  method: 'POST',
  url: '/v1/chat/completions',
  body: { model, messages: [{ role: 'user', content: `hello ${i}` }] },
})).join('\n') + '\n';

const file = await client.files.create({
  file: await toFile(Buffer.from(lines), 'input.jsonl'),
  purpose: 'batch',
});
assert.match(file.id, /^file-/);
assert.equal(file.object, 'file');
assert.equal(file.purpose, 'batch');
assert.equal(file.bytes, Buffer.byteLength(lines));
assert.equal((await client.files.retrieve(file.id)).id, file.id);

const created = await client.batches.create({
  input_file_id: file.id,
  endpoint: '/v1/chat/completions',
  completion_window: '24h',
  metadata: { run: 'node-compat' },
});
assert.equal(created.object, 'batch');
assert.equal(created.status, 'validating');
assert.deepEqual(created.metadata, { run: 'node-compat' });

let batch = created;
for (let i = 0; i < 300 && !terminal.includes(batch.status); i++) {
  await new Promise((r) => setTimeout(r, 100));
  batch = await client.batches.retrieve(created.id);
}
assert.equal(batch.status, 'completed');
assert.deepEqual(batch.request_counts, { total: 5, completed: 5, failed: 0 });
assert.equal(batch.error_file_id, null);

const text = await (await client.files.content(batch.output_file_id)).text();
const ids = text.trim().split('\n').map((l) => JSON.parse(l)).map((l) => {
  assert.equal(l.response.status_code, 200);
  assert.equal(l.error, null);
  return l.custom_id;
});
assert.deepEqual(ids, ['node-0', 'node-1', 'node-2', 'node-3', 'node-4']);

// Auto-pagination walks every page with `after`.
const second = await client.batches.create({
  input_file_id: file.id,
  endpoint: '/v1/chat/completions',
  completion_window: '24h',
});
const seen = [];
for await (const b of client.batches.list({ limit: 1 })) seen.push(b.id);
assert.deepEqual(seen, [second.id, created.id]);

const cancelled = await client.batches.cancel(second.id).catch((e) => e);
if (cancelled instanceof Error) {
  // The second batch may have finished already: then cancel is a conflict.
  assert.ok(cancelled instanceof OpenAI.ConflictError, String(cancelled));
} else {
  assert.ok(['cancelling', 'cancelled'].includes(cancelled.status), cancelled.status);
}
const conflict = await client.batches.cancel(created.id).catch((e) => e);
assert.ok(conflict instanceof OpenAI.ConflictError, String(conflict));
const missing = await client.batches.retrieve('batch_does_not_exist').catch((e) => e);
assert.ok(missing instanceof OpenAI.NotFoundError, String(missing));
assert.equal(missing.error?.type, 'invalid_request_error');

// The input file of a batch that has not ended is in use (409): wait for the cancel to land.
let last = await client.batches.retrieve(second.id);
for (let i = 0; i < 300 && !terminal.includes(last.status); i++) {
  await new Promise((r) => setTimeout(r, 100));
  last = await client.batches.retrieve(second.id);
}
const deleted = await client.files.delete(file.id);
assert.deepEqual(deleted, { id: file.id, object: 'file', deleted: true });
const gone = await client.files.retrieve(file.id).catch((e) => e);
assert.ok(gone instanceof OpenAI.NotFoundError, String(gone));
console.log('node compat: ok');

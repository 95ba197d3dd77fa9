"""Drives a running Sluice with the official `openai` Python SDK, in strict response validation mode.

Environment: OPENAI_BASE_URL (ending in /v1), OPENAI_API_KEY, optionally SLUICE_MODEL (the model the
upstream serves, default "mock-model"). Exits non-zero on the first failed check.

Run by tests/tests/it/compat.rs; by hand: `OPENAI_BASE_URL=http://localhost:8080/v1
OPENAI_API_KEY=sk-demo SLUICE_MODEL=demo-model python tests/python/compat.py`.
"""

import json
import os
import sys
import tempfile
import time
import traceback

import openai
from openai import OpenAI

MODEL = os.environ.get("SLUICE_MODEL", "mock-model")
ENDPOINT = "/v1/chat/completions"


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def step(name):
    print(f"-- {name}", flush=True)


def write_jsonl(lines):
    fd, path = tempfile.mkstemp(prefix="sluice-compat-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def chat_line(custom_id, text, mock=None):
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if mock is not None:
        body["mock"] = dict(mock, key=custom_id)
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}


def wait_for(client, batch_id, statuses, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        check(time.monotonic() < deadline, f"batch {batch_id} stuck in {batch.status}, wanted {statuses}")
        time.sleep(0.1)


def expect(exception, call, what):
    try:
        call()
    except exception as e:
        return e
    raise AssertionError(f"{what}: expected {exception.__name__}, nothing was raised")


def main():
    client = OpenAI(_strict_response_validation=True, max_retries=0)
    print(f"openai {openai.__version__} against {client.base_url}", flush=True)
    paths = []
    try:
        run(client, paths)
    finally:
        for p in paths:
            os.unlink(p)


def run(client, paths):
    step("files.create / retrieve / list")
    ids = [f"compat-{i}" for i in range(5)]
    # Non-ASCII text must survive upload, the pipeline and `files.content(...).text` decoding.
    texts = {i: f"question {i}: héllo wörld 日本 ✓" for i in ids}
    path = write_jsonl([chat_line(i, texts[i]) for i in ids])
    paths.append(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        f = client.files.create(file=fh, purpose="batch")
    check(f.id.startswith("file-"), f"file id {f.id}")
    check(f.object == "file", f.object)
    check(f.purpose == "batch", f.purpose)
    check(f.status == "processed", f"status {f.status}")
    check(f.bytes == size, f"bytes {f.bytes} != {size}")
    check(f.filename == os.path.basename(path), f"filename {f.filename}")
    check(abs(f.created_at - time.time()) < 60, f"created_at {f.created_at}")
    got = client.files.retrieve(f.id)
    check(got == f, f"retrieve differs: {got} vs {f}")
    check(f.id in [x.id for x in client.files.list()], "file not listed")
    check(f.id in [x.id for x in client.files.list(purpose="batch", order="asc", limit=1)], "file not listed (paged)")
    # wait_for_processing returns at once for a processed file.
    check(client.files.wait_for_processing(f.id, max_wait_seconds=5).status == "processed", "wait_for_processing")

    limit = int(os.environ.get("SLUICE_MAX_UPLOAD_BYTES", "0"))
    if limit:
        step("files.create over the size limit: 413")
        big_path = write_jsonl([chat_line("big", "x" * 1000)] * (2 * limit // 1000 + 1))
        paths.append(big_path)
        with open(big_path, "rb") as fh:
            e = expect(openai.APIStatusError, lambda: client.files.create(file=fh, purpose="batch"), "upload too large")
        check(e.status_code == 413, f"status {e.status_code}")
        check(e.code == "file_too_large" and e.param == "file", f"code {e.code} param {e.param}")
        check(f.id in [x.id for x in client.files.list()], "listing after a refused upload")

    step("batches.create / retrieve until completed")
    metadata = {"suite": "compat", "sdk": "python"}
    b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata)
    check(b.id.startswith("batch_"), b.id)
    check(b.object == "batch", b.object)
    check(b.status == "validating", b.status)
    check(b.input_file_id == f.id, b.input_file_id)
    check(b.endpoint == ENDPOINT, b.endpoint)
    check(b.completion_window == "24h", b.completion_window)
    check(b.metadata == metadata, f"metadata {b.metadata}")
    check(b.expires_at - b.created_at == 86400, f"expires_at {b.expires_at} created_at {b.created_at}")
    check(b.request_counts is not None and b.request_counts.total == 0, f"request_counts {b.request_counts}")
    done = wait_for(client, b.id, {"completed", "failed", "expired", "cancelled"})
    check(done.status == "completed", f"batch ended {done.status}: {done.errors}")
    check(done.request_counts.total == 5, f"{done.request_counts}")
    check(done.request_counts.completed == 5, f"{done.request_counts}")
    check(done.request_counts.failed == 0, f"{done.request_counts}")
    check(done.completed_at is not None and done.in_progress_at is not None, "timestamps")
    check(done.finalizing_at is not None, "finalizing_at")
    check(done.output_file_id is not None, "output_file_id")
    check(done.error_file_id is None, f"error_file_id {done.error_file_id}")
    check(done.errors is None, f"errors {done.errors}")
    check(done.model == MODEL, f"model {done.model}")
    check(done.usage is not None and done.usage.total_tokens > 0, f"usage {done.usage}")
    check(done.metadata == metadata, f"metadata {done.metadata}")

    step("batches.list auto-pagination")
    # limit=1 makes every item its own page, so the SDK must follow `after` cursors.
    listed = [x.id for x in client.batches.list(limit=1)]
    check(listed.count(b.id) == 1, f"batch listed {listed.count(b.id)} times in {listed}")
    check(len(listed) == len(set(listed)), f"duplicates in {listed}")

    step("files.content of the output")
    out = client.files.retrieve(done.output_file_id)
    check(out.purpose == "batch_output", out.purpose)
    text = client.files.content(done.output_file_id).text
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    check(sorted(r["custom_id"] for r in rows) == sorted(ids), f"custom ids {[r['custom_id'] for r in rows]}")
    for r in rows:
        check(r["id"].startswith("batch_req_"), r["id"])
        check(r["error"] is None, f"error {r['error']}")
        check(r["response"]["status_code"] == 200, r["response"])
        check(r["response"]["body"]["object"] == "chat.completion", r["response"]["body"])
        answer = r["response"]["body"]["choices"][0]["message"]["content"]
        check(texts[r["custom_id"]] in answer, f"{r['custom_id']}: answer {answer!r}")
    check(out.bytes == len(text.encode()), f"output bytes {out.bytes} != {len(text.encode())}")

    step("batches.cancel of a running batch")
    slow_path = write_jsonl([chat_line(f"slow-{i}", "wait", mock={"delay_ms": 1500}) for i in range(40)])
    paths.append(slow_path)
    with open(slow_path, "rb") as fh:
        slow_file = client.files.create(file=fh, purpose="batch")
    slow = client.batches.create(input_file_id=slow_file.id, endpoint=ENDPOINT, completion_window="24h")
    cancelling = client.batches.cancel(slow.id)
    check(cancelling.id == slow.id, cancelling.id)
    check(cancelling.status in ("cancelling", "cancelled"), f"cancel answered {cancelling.status}")
    check(cancelling.cancelling_at is not None, "cancelling_at")
    again = client.batches.cancel(slow.id)
    check(again.status in ("cancelling", "cancelled"), f"second cancel answered {again.status}")
    cancelled = wait_for(client, slow.id, {"cancelled"})
    check(cancelled.cancelled_at is not None, "cancelled_at")
    counts = cancelled.request_counts
    check(counts.completed + counts.failed <= 40, f"{counts}")

    step("cancel of a completed batch: 409, not retried")
    requests = []
    counting = OpenAI(
        _strict_response_validation=True,
        max_retries=2,
        # The SDK's own client class (httpx or httpx2 depending on the SDK version), counting requests.
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [requests.append]}),
    )
    started = time.monotonic()
    e = expect(openai.ConflictError, lambda: counting.batches.cancel(b.id), "cancel of a completed batch")
    elapsed = time.monotonic() - started
    check(e.status_code == 409, e.status_code)
    check(e.response.headers.get("x-should-retry") == "false", dict(e.response.headers))
    check("completed" in e.message, e.message)
    check(len(requests) == 1, f"the SDK sent {len(requests)} requests (retried a deterministic 409)")
    check(elapsed < 2.0, f"cancel took {elapsed:.2f}s")
    check(client.batches.retrieve(b.id).status == "completed", "completed batch changed by cancel")

    step("errors: NotFoundError, AuthenticationError, BadRequestError")
    e = expect(openai.NotFoundError, lambda: client.batches.retrieve("batch_does_not_exist"), "missing batch")
    check(e.status_code == 404, e.status_code)
    check(isinstance(e.body, dict) and "message" in e.body, f"body {e.body}")
    expect(openai.NotFoundError, lambda: client.files.retrieve("file-does-not-exist"), "missing file")
    bad = OpenAI(api_key="sk-definitely-wrong", max_retries=0, _strict_response_validation=True)
    e = expect(openai.AuthenticationError, lambda: bad.batches.list(), "bad key")
    check(e.status_code == 401, e.status_code)
    check(e.code == "invalid_api_key", f"code {e.code}")
    e = expect(
        openai.BadRequestError,
        lambda: client.batches.create(input_file_id=f.id, endpoint="/v1/invalid/endpoint", completion_window="24h"),
        "bad endpoint",
    )
    check(e.param == "endpoint" and e.code == "invalid_value", f"param {e.param} code {e.code}")
    e = expect(
        openai.BadRequestError,
        lambda: client.batches.create(
            input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", metadata={"tags": ["a"]}
        ),
        "non-string metadata",
    )
    check(e.param == "metadata.tags" and e.code == "invalid_type", f"param {e.param} code {e.code}")

    step("files.delete")
    deleted = client.files.delete(f.id)
    check(deleted.id == f.id and deleted.deleted is True and deleted.object == "file", f"{deleted}")
    expect(openai.NotFoundError, lambda: client.files.retrieve(f.id), "deleted file")
    check(f.id not in [x.id for x in client.files.list()], "deleted file still listed")
    print("compat: all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)

"""Creates a file and batches with the official openai SDK through a proxy that loses the first
answer of each create (tests/src/lossy_proxy.rs): the SDK times out and retries on its own.

Prints one JSON object: the ids the SDK got back. The Rust test compares them with what the API
answered to every attempt and with the batches that exist.

Environment: OPENAI_BASE_URL (the proxy), OPENAI_API_KEY, SLUICE_MODEL, SLUICE_TIMEOUT (seconds
the SDK waits for an answer), SLUICE_RUN (makes the keys unique to this run).
"""

import json
import os
import tempfile

from openai import OpenAI

LOSE_FIRST = "x-test-lose-first"

run = os.environ["SLUICE_RUN"]
client = OpenAI(timeout=float(os.environ["SLUICE_TIMEOUT"]), max_retries=3)
model = os.environ["SLUICE_MODEL"]
lines = "".join(
    json.dumps(
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
    )
    + "\n"
    for i in range(3)
).encode()

# An upload whose first answer is lost, with a key: the SDK's retry (a new multipart boundary,
# the open file read again from its start) gets the first file back.
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "requests.jsonl")
    with open(path, "wb") as out:
        out.write(lines)
    with open(path, "rb") as file:
        uploaded = client.files.create(
            file=file,
            purpose="batch",
            extra_headers={"Idempotency-Key": f"upload-{run}", LOSE_FIRST: "upload"},
        )

# The same lost answer without a key: the SDK's retry creates a second batch.
unkeyed = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    extra_headers={LOSE_FIRST: "unkeyed"},
)

# With a key: the retry gets the first batch back, and no second one exists.
keyed = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"attempt": "keyed"},
    extra_headers={"Idempotency-Key": f"batch-{run}", LOSE_FIRST: "keyed"},
)

print(json.dumps({"file": uploaded.id, "unkeyed": unkeyed.id, "keyed": keyed.id}))

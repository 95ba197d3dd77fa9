"""The README's example of a batch of several models, run with the official `openai` Python SDK in
strict response validation mode.

Environment: OPENAI_BASE_URL (ending in /v1), OPENAI_API_KEY, SLUICE_MODELS (comma-separated models,
each served by another provider). Prints which model answered each line, then a last line
`mixed: ok`; exits non-zero on the first failed check.

Run by tests/tests/it/mixed_models.rs.
"""

import json
import os
import tempfile
import time

from openai import OpenAI

MODELS = os.environ["SLUICE_MODELS"].split(",")

client = OpenAI(_strict_response_validation=True, max_retries=0)

fd, path = tempfile.mkstemp(prefix="sluice-mixed-", suffix=".jsonl")
with os.fdopen(fd, "w", encoding="utf-8") as f:
    for i, model in enumerate(MODELS):
        body = {"model": model, "messages": [{"role": "user", "content": f"line {i}"}]}
        line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        f.write(json.dumps(line) + "\n")
try:
    with open(path, "rb") as upload:
        f = client.files.create(file=upload, purpose="batch")
finally:
    os.unlink(path)
b = client.batches.create(
    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
)
deadline = time.monotonic() + 30
while b.status not in ("completed", "failed", "expired", "cancelled"):
    if time.monotonic() > deadline:
        raise SystemExit(f"batch {b.id} did not finish: {b.status}")
    time.sleep(0.1)
    b = client.batches.retrieve(b.id)
if b.status != "completed":
    raise SystemExit(f"batch {b.id} ended {b.status}: {b.errors}")
if b.model is not None:
    raise SystemExit(f"a batch of several models names one: {b.model!r}")
for line in client.files.content(b.output_file_id).text.splitlines():
    row = json.loads(line)
    print(row["custom_id"], row["response"]["body"]["model"])
print("mixed: ok")

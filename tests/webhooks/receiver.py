"""A webhook receiver for the tests: verifies each request with the `standardwebhooks` package
(not with Sluice's code) and appends one JSON line per request to a log file.

usage: receiver.py PORT SECRET FAIL_FIRST LOG_PATH
The first FAIL_FIRST requests that verify are answered 503 (an endpoint still starting); the
rest 200. A request that does not verify is answered 400.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

port, secret, fail_first, log_path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
webhook = Webhook(secret)
lock = threading.Lock()
verified_seen = 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global verified_seen
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k: v for k, v in self.headers.items()}
        try:
            event = webhook.verify(body, headers)
            verified = True
        except WebhookVerificationError as e:
            event, verified = {"error": str(e)}, False
        with lock:
            if verified:
                verified_seen += 1
            answer = 400 if not verified else (503 if verified_seen <= fail_first else 200)
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps({
                    "webhook_id": headers.get("webhook-id"),
                    "verified": verified,
                    "answered": answer,
                    "event": event,
                }) + "\n")
        self.send_response(answer)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()

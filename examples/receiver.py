#!/usr/bin/env python3
"""A webhook receiver for the worked example: prints every request botflow sends,
checks its signature with the chatbot's secret (`botflow chatbots secret ID`; during
the grace period of `botflow chatbots rotate-secret` the request carries a signature of
the old secret too, and the one matching is enough), and
answers with a ticket number the workflow uses in its reply.

The secret comes from BOTFLOW_WEBHOOK_SECRET, or else from the file named by
BOTFLOW_WEBHOOK_SECRET_FILE (default var/webhook.secret), read at each request, so the
receiver can be started before the chatbot exists.

    python3 examples/receiver.py [PORT]     (default 8099)
"""
import hashlib
import hmac
import itertools
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

tickets = itertools.count(1001)
secret_file = os.environ.get("BOTFLOW_WEBHOOK_SECRET_FILE", "var/webhook.secret")


def current_secret():
    if os.environ.get("BOTFLOW_WEBHOOK_SECRET"):
        return os.environ["BOTFLOW_WEBHOOK_SECRET"]
    try:
        with open(secret_file) as f:
            return f.read().strip()
    except OSError:
        return ""


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        signature = self.headers.get("X-Botflow-Signature", "")
        secret = current_secret()
        verdict = f"not checked (no secret in {secret_file})"
        if secret:
            ts = self.headers.get("X-Botflow-Timestamp", "")
            mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
            # While a rotated secret's grace period runs the header holds two
            # signatures, "v1=<new>,v1=<old>": either one matching is enough.
            valid = any(hmac.compare_digest(sig.strip(), f"v1={mac}") for sig in signature.split(","))
            verdict = "valid" if valid else "INVALID"
        print(f"webhook {self.path}  idempotency-key={self.headers.get('Idempotency-Key')}  signature {verdict}")
        print(f"  {body.decode()}", flush=True)
        answer = json.dumps({"ticket": f"T-{next(tickets)}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
print(f"listening on http://127.0.0.1:{port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()

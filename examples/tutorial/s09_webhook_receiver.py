"""Step 9: a tiny webhook receiver, to see what pyoco posts when a run ends.

    python examples/tutorial/s09_webhook_receiver.py 8765       # terminal 1 (0: any free port)
    PYOCO_WEBHOOK_URL=http://127.0.0.1:8765/hook \
        python -m pyoco run examples/tutorial/s09_watched.py     # terminal 2

Set the same PYOCO_WEBHOOK_SECRET in both terminals to check signatures.
Standard library only; it listens on 127.0.0.1.
"""
import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def signature_ok(body, header, secret):
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header or "")


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        secret = os.environ.get("PYOCO_WEBHOOK_SECRET")
        signed = ""
        if secret:      # check the raw bytes, before parsing the JSON
            ok = signature_ok(body, self.headers.get("X-Pyoco-Signature"), secret)
            signed = " (signature ok)" if ok else " (BAD SIGNATURE)"
        msg = json.loads(body)
        tasks = ", ".join("%s=%s" % (name, t["state"]) for name, t in msg["tasks"].items())
        print("📬 %s flow=%s status=%s tasks: %s%s"
              % (msg["event"], msg["flow"], msg["status"], tasks, signed), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format, *args):
        pass            # keep the terminal for the webhooks


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    server = HTTPServer(("127.0.0.1", port), Hook)
    print("listening on http://127.0.0.1:%d/hook" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass

"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests (run as a subprocess so a
test can kill it). It answers like a judge ("SOLVABLE: yes / CORRECT: yes"; "SOLVABLE: no" when the user text
contains UNSOLVABLE) and misbehaves on request, the first time it sees each distinct request:

    python tests/judge_server.py --log FILE [--first 429|500|slow|malformed] [--slow S] [--die-after N]

A request whose user text contains TOOLONG is always refused with HTTP 400 (as vLLM refuses a prompt longer
than the model's context).

It prints "PORT <n>" once listening. Every request and every completed reply is appended to --log as a JSON
line with a hash of the request's messages, so a test counts on the server side what was asked and answered.
--die-after N: N requests are answered; the next one kills the process (no reply) once those N replies are out.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", required=True)
    ap.add_argument("--first", default="", choices=["", "429", "500", "slow", "malformed"])
    ap.add_argument("--always", default="", choices=["", "malformed", "401", "302"])
    ap.add_argument("--slow", type=float, default=2.0)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--expect-key", default="", help="log whether the Authorization header carries this key")
    args = ap.parse_args()
    lock = threading.Lock()
    seen: set = set()
    state = {"granted": 0, "sent": 0}  # requests let through to a reply (on arrival), replies sent

    def log(obj):
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def send(self, status, body: bytes, headers=()):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def do_GET(self):  # only a followed redirect would get here
            log({"event": "request", "key": "", "path": self.path, "auth": self.headers.get("Authorization")})
            self.send(404, b'{"error": {"message": "no such route"}}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            messages = body["messages"]
            key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            with lock:
                first = key not in seen
                seen.add(key)
                die = args.die_after and state["granted"] >= args.die_after
                state["granted"] += not die
            if die:  # let the replies already granted go out, then die without answering this one
                deadline = time.time() + 10
                while state["sent"] < args.die_after and time.time() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            entry = {"event": "request", "key": key, "path": self.path, "model": body.get("model")}
            if args.expect_key:
                entry["auth_ok"] = self.headers.get("Authorization") == f"Bearer {args.expect_key}"
            log(entry)
            if args.always == "401":
                return self.send(401, b'{"error": {"message": "invalid api key"}}')
            if args.always == "302":
                return self.send(302, b"", [("Location", "/elsewhere/chat/completions")])
            if args.always == "malformed":
                return self.send(200, b'{"choices": [')
            if first and args.first == "429":
                return self.send(429, b'{"error": {"message": "rate limited"}}', [("Retry-After", "0")])
            if first and args.first == "500":
                return self.send(500, b'{"error": {"message": "internal"}}')
            if "TOOLONG" in messages[-1]["content"]:
                return self.send(400, b'{"error": {"message": "prompt is longer than the context"}}')
            if first and args.first == "malformed":
                return self.send(200, b"<html>not json</html>")
            if first and args.first == "slow":
                time.sleep(args.slow)
            user = messages[-1]["content"]
            text = "SOLVABLE: no\nCORRECT: no" if "UNSOLVABLE" in user else "SOLVABLE: yes\nCORRECT: yes"
            reply = {"id": "x", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}]}
            try:
                self.send(200, json.dumps(reply).encode())
                log({"event": "reply", "key": key})
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): not a reply received
                pass
            finally:
                with lock:
                    state["sent"] += 1

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()

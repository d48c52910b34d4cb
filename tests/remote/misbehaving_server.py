#!/usr/bin/env python3
"""A deliberately broken OpenAI-compatible server, for copilot's remote-engine failure tests only (the real-server
tests use llama.cpp's llama-server). Every reply misbehaves according to MODE:

  malformed  200 with a body that is not JSON
  noshape    200 with JSON lacking choices[0].message.content
  error500   HTTP 500 (counts requests in a file, so the test can see the retries)
  error401   HTTP 401
  slow       waits SECONDS before answering (past the client's timeout)

usage: misbehaving_server.py PORT MODE [SECONDS] [COUNT_FILE]
"""
import http.server
import json
import sys
import time

PORT, MODE = int(sys.argv[1]), sys.argv[2]
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
COUNT = sys.argv[4] if len(sys.argv) > 4 else None


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if COUNT:
            with open(COUNT, "a") as f:
                f.write("x\n")
        if MODE == "malformed":
            self.reply(200, "this is { not json")
        elif MODE == "noshape":
            self.reply(200, json.dumps({"object": "chat.completion", "choices": []}))
        elif MODE == "error500":
            self.reply(500, json.dumps({"error": "internal"}))
        elif MODE == "error401":
            self.reply(401, json.dumps({"error": {"message": "invalid api key"}}))
        elif MODE == "slow":
            time.sleep(SECONDS)
            self.reply(200, json.dumps({"choices": [{"message": {"content": "SELECT 1"}}]}))


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()

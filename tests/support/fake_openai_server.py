"""A chat-completions server for tests (stdlib only). Behaviour per image is looked up by the sha1 of
the image's base64 data in a JSON file given as argv[1] (its "default" entry for other images, else
ok): ok, fenced, slow_once, error500_once, garbage, bad_body. Text-only requests get two rewritten captions. Prints the port, then serves;
every request's path and whether it carried "Authorization: Bearer <argv[2]>" goes to argv[3] (JSONL)."""

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from records import RED_TSHIRT  # beside this script (its folder is first on sys.path)

with open(sys.argv[1]) as behaviours:
    BEHAVIOURS = json.load(behaviours)
EXPECTED_KEY = sys.argv[2]
LOG = sys.argv[3]
SEEN: dict[str, int] = {}
LOCK = threading.Lock()
GOOD = RED_TSHIRT


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chat(self, content: str) -> None:
        self._reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with LOCK, open(LOG, "a") as log:
            log.write(
                json.dumps(
                    {"path": self.path, "auth_ok": self.headers.get("Authorization") == f"Bearer {EXPECTED_KEY}"}
                )
                + "\n"
            )
        content = request["messages"][0]["content"]
        if isinstance(content, str):
            return self._chat('Here you go: ["is a bright shade with a new look", "has the requested change now"]')
        data = next(p["image_url"]["url"] for p in content if p["type"] == "image_url").split(",", 1)[1]
        key = hashlib.sha1(data.encode()).hexdigest()
        behaviour = BEHAVIOURS.get(key, BEHAVIOURS.get("default", "ok"))
        with LOCK:
            SEEN[key] = SEEN.get(key, 0) + 1
            first = SEEN[key] == 1
        if behaviour == "slow_once" and first:
            time.sleep(3)
        if behaviour == "error500_once" and first:
            return self._reply(500, b'{"error": "overloaded"}')
        if behaviour == "bad_body":
            return self._reply(200, b"<html>gateway says hello</html>")
        if behaviour == "garbage":
            return self._chat("I am sorry, I cannot describe this image.")
        if behaviour == "fenced":
            answer = dict(GOOD, category="Tee", color="Gray", kids="no")
            return self._chat(
                "Sure! Here is the JSON:\n```json\n" + json.dumps(answer) + "\n```\nLet me know if you need more."
            )
        return self._chat(json.dumps(GOOD))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()

"""A real OpenAI-compatible chat server on 127.0.0.1 for the judge tests: POST /v1/chat/completions answered
by a deterministic rule `rule(messages, count) -> str | (status, str)`; it counts the requests it got and
keeps the Authorization headers it saw."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, rule):
        self.rule = rule
        self.requests = 0
        self.authorizations = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.authorizations.add(self.headers.get("Authorization"))
                    count = server.requests
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                answer = server.rule(body["messages"], count)
                status, text = answer if isinstance(answer, tuple) else (200, answer)
                if status != 200:
                    return self._send(status, {"error": {"message": text}}, {"retry-after-ms": "20"})
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                self._send(
                    200,
                    {
                        "id": f"c{count}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [choice],
                    },
                )

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def answers_shown(messages) -> tuple[str, str]:
    """(A, B) of a pairwise prompt (eval.judge.pairwise_messages)."""
    text = messages[-1]["content"]
    a = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", text, re.S).group(1)
    b = re.search(r"Answer B:\n(.*?)\n\nConsider", text, re.S).group(1)
    return a, b


def answer_rated(messages) -> str:
    """The answer of a rubric prompt (eval.judge.rubric_messages)."""
    return re.search(r"Answer to evaluate:\n(.*?)\n\nCriterion", messages[-1]["content"], re.S).group(1)


def prefers_keyword(keyword: str):
    """Prefers the answer containing `keyword`; tie when both or neither do."""

    def rule(messages, count):
        a, b = answers_shown(messages)
        if (keyword in a) == (keyword in b):
            return "tie"
        return "A" if keyword in a else "B"

    return rule

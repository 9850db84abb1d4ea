"""Calls an ASGI app in-process, as an HTTP server would (starlette's TestClient needs httpx, which the
test environment lacks). A body given as a list of chunks is sent without Content-Length, as chunked
transfer encoding arrives."""

import asyncio
import json


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(app, method, path, body=None, headers=None, root_path=""):
    """body: bytes, a JSON-able object, or a list of byte chunks (sent chunked; reading stops when the
    app stops asking). Answer.received: how many body bytes the app read."""
    if body is not None and not isinstance(body, (bytes, list)):
        body = json.dumps(body).encode()
    chunks = body if isinstance(body, list) else [body or b""]
    hdrs = dict(headers or {})
    if not isinstance(body, list):
        hdrs.setdefault("content-length", str(len(chunks[0])))
    scope = {"type": "http", "http_version": "1.1", "method": method, "scheme": "http", "path": root_path + path,
             "raw_path": (root_path + path).encode(), "root_path": root_path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = {"n": 0, "bytes": 0}
    out = {"status": None, "headers": [], "body": b""}

    async def receive():
        if sent["n"] < len(chunks):
            chunk = chunks[sent["n"]]
            sent["n"] += 1
            sent["bytes"] += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": sent["n"] < len(chunks)}
        await asyncio.sleep(3600)  # nothing more: a real client waits for the answer

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    answer = Answer(out["status"], {k.decode(): v.decode() for k, v in out["headers"]}, out["body"])
    answer.received = sent["bytes"]
    return answer

"""Calls an ASGI app in-process, as an HTTP server would (starlette's TestClient needs httpx, which the
test environment lacks). A body given as a list of chunks is sent without Content-Length, as chunked
transfer encoding arrives."""

import asyncio
import json
import time


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(app, method, path, body=None, headers=None, root_path="", then="wait", cancel_after=None):
    """body: bytes, a JSON-able object, or a list of byte chunks (sent chunked; reading stops when the
    app stops asking). Answer.received: how many body bytes the app read. `then`, what the client does
    after its body: "wait" for the answer, "stall" (the body never ends: its last chunk says more is
    coming) or "disconnect". `cancel_after`: seconds after which the server cancels the request (as Ray
    Serve's proxy does when a client goes away). Answer.seconds: how long the app took."""
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
            return {"type": "http.request", "body": chunk,
                    "more_body": sent["n"] < len(chunks) or then != "wait"}
        if then == "disconnect":
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # nothing more: a real client waits for the answer (or stalls)

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    async def serve():
        task = asyncio.ensure_future(app(scope, receive, send))
        if cancel_after is not None:
            asyncio.get_running_loop().call_later(cancel_after, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    t0 = time.perf_counter()
    asyncio.run(serve())
    answer = Answer(out["status"], {k.decode(): v.decode() for k, v in out["headers"]}, out["body"])
    answer.received, answer.seconds = sent["bytes"], time.perf_counter() - t0
    return answer

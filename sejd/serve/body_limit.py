"""ASGI middleware that reads a request body for the app, at most `limit` bytes of it.

A body announced larger than the limit (Content-Length) is refused with 413 before a byte of it is read;
a body without a length (chunked) is read until it passes the limit, then refused, so no body ever costs
more than limit + one chunk of memory. The body is handed to the app as JSON whatever its Content-Type:
the service speaks only JSON, and `curl -d` labels its data form-encoded.
"""

from __future__ import annotations

JSON_TYPE = (b"content-type", b"application/json")


class JsonBodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await self._refuse(scope, receive, send, 400, f"Content-Length must be a number of bytes, "
                                                                 f"got {length[:20]!r}")
        if int(length) > self.limit:
            return await self._refuse(scope, receive, send, 413, f"larger than {self.limit} bytes "
                                                                 f"(Content-Length {int(length)})")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:  # a chunked body: stop reading at the first chunk past the limit
                return await self._refuse(scope, receive, send, 413, f"larger than {self.limit} bytes")
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body, the server's own messages (e.g. disconnect)
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        if body:
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != JSON_TYPE[0]] + [JSON_TYPE]}
        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str):
        from starlette.responses import JSONResponse

        await JSONResponse({"error": f"body: {message}", "field": "body"}, status_code=status)(scope, receive, send)

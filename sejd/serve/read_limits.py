"""How long and how much a client may take to send a request, enforced where the bytes are read.

`sejd serve` runs on Ray Serve: Ray's HTTP proxy (uvicorn, with httptools parsing) reads each request and
hands it to a replica, where the app (`sejd.serve.api`) runs. Ray gives the proxy no read deadline and no
limit on header size or count, and it hands a request to the replica as soon as its headers are parsed:
the replica then pulls the body through the proxy, holding one of its `max_ongoing_requests` slots while
the client sends it. So a client that sends headers and part of a body, or headers one byte at a time,
used to hold a slot, or a connection, for as long as it liked. The bounds (`ReadLimits`):

  * headers: complete within `read_timeout_s` of the connection opening (on a kept-alive connection, of the
    request's first byte), else 408; at most `max_headers` fields and `max_header_bytes` bytes (request
    line included), else 431. A connection that sends nothing is closed after `read_timeout_s`.
  * body: complete within `read_timeout_s` of the headers, else 408; at most `max_body_bytes`, else 413
    (refused from its Content-Length before a byte of it is read).

Every refusal is a JSON body in the service's style (`{"error": ..., "field": ...}`) with
`connection: close`. They are enforced in two places:

  * in Ray's proxy (`install`, run in every Ray worker of the job as its `worker_process_setup_hook`):
    header limits in the proxy's HTTP protocol (`guarded_protocol`, a subclass of uvicorn's httptools
    protocol), and the body read by `BodyLimit` in front of Ray's proxy app, so a request reaches a replica
    only once its body has arrived whole: slow clients hold proxy connections, never replica slots;
  * in the app itself (`BodyLimit` as ASGI middleware): the same header and body limits, for an app run
    by a proxy without the hook (a Serve instance another job started) or by another ASGI server.

This module imports only the standard library at the top: it is pickled by value into Ray's proxy and
controller processes (`runtime_env`), which then never import sejd (nor torch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import logging
import os

READ_TIMEOUT_S = 10.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
LINGER_S = 2.0  # after refusing a request mid-send: read and drop what the client still sends, then close
ENV = "SEJD_READ_LIMITS"  # the limits, as JSON, in the environment of the job's Ray workers

logger = logging.getLogger("sejd.serve")


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    read_timeout_s: float = READ_TIMEOUT_S
    max_headers: int = MAX_HEADERS
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "ReadLimits | None":
        text = os.environ.get(ENV)  # read when called: this class is pickled by value, defaults with it
        return cls(**json.loads(text)) if text else None


def header_refusal(fields: int, size: int, limits: ReadLimits) -> str | None:
    """Why headers of `fields` fields and `size` bytes are refused (431), or None."""
    if fields > limits.max_headers:
        return f"more than {limits.max_headers} header fields"
    if size > limits.max_header_bytes:
        return f"headers larger than {limits.max_header_bytes} bytes"
    return None


def field_bytes(name: bytes, value: bytes) -> int:
    return len(name) + len(value) + 4  # "name: value\r\n"


def error_json(error: str, field: str | None) -> bytes:
    return json.dumps({"error": error, "field": field}, separators=(",", ":")).encode()


async def refuse(send, status: int, error: str, field: str | None, close: bool = False) -> None:
    """Answer an ASGI request with `{"error", "field"}`; `close`: and close the connection after it."""
    body = error_json(error, field)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


JSON_TYPE = (b"content-type", b"application/json")


class BodyLimit:
    """ASGI middleware that reads a request's body for the app, within `limits`: at most max_body_bytes
    (a larger Content-Length is refused with 413 before a byte is read; a chunked body is read until it
    passes the limit), within read_timeout_s (408), and with headers within their limits (431). The app
    sees the whole body at once. `json_body`: the body is handed to the app as JSON whatever its
    Content-Type (the service speaks only JSON, and `curl -d` labels its data form-encoded)."""

    def __init__(self, app, limits: ReadLimits = ReadLimits(), json_body: bool = False):
        self.app, self.limits, self.json_body = app, limits, json_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.limits
        why = header_refusal(len(scope["headers"]), sum(field_bytes(k, v) for k, v in scope["headers"]), limits)
        if why is not None:
            return await refuse(send, 431, f"request {why}", None, close=True)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await refuse(send, 400, f"body: Content-Length must be a number of bytes, got {length[:20]!r}",
                                "body")
        if int(length) > limits.max_body_bytes:
            return await refuse(send, 413, f"body: larger than {limits.max_body_bytes} bytes "
                                           f"(Content-Length {int(length)})", "body")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                of = f" of {int(length)}" if b"content-length" in headers else ""
                return await refuse(send, 408, f"request body not received within {limits.read_timeout_s:g} s "
                                               f"({size}{of} bytes came); the connection is closed", None,
                                    close=True)
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limits.max_body_bytes:  # a chunked body: stop reading at the first chunk past the limit
                return await refuse(send, 413, f"body: larger than {limits.max_body_bytes} bytes", "body",
                                    close=True)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body, the server's own messages (e.g. disconnect)
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        if body and self.json_body:
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != JSON_TYPE[0]] + [JSON_TYPE]}
        await self.app(scope, replay, send)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that is refused."""


def guarded_protocol(limits: ReadLimits):
    """uvicorn's httptools HTTP protocol with `limits` on the request head: a deadline for the headers,
    and a cap on their count and size. None where httptools (uvicorn's default parser) is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        read_limits = limits

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._late = None  # the timer of the head's deadline
            self._began = False  # a request's first byte came
            self._in_head = False
            self._fields = self._size = self._raw = 0
            self._refusal = None  # (status, message) answered instead of uvicorn's 400
            self._lingering = False

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # refused: what still comes is dropped
            super().data_received(data)
            if self._in_head and not self._lingering and not self.transport.is_closing():
                # a head still incomplete: bound the bytes it has cost
                self._raw += len(data)
                if self._raw > self.read_limits.max_header_bytes:
                    self._refuse(431, f"request headers larger than {self.read_limits.max_header_bytes} bytes")

        def on_message_begin(self):
            super().on_message_begin()
            self._began, self._in_head = True, True
            self._fields = self._size = self._raw = 0
            if self._late is None:
                self._arm()

        def on_url(self, url: bytes):
            super().on_url(url)
            self._count(0, len(url))

        def on_header(self, name: bytes, value: bytes):
            super().on_header(name, value)
            self._count(1, field_bytes(name, value))

        def on_headers_complete(self):
            self._in_head = False
            self._disarm()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                return super().send_400_response(msg)
            self._refuse(*self._refusal)

        def _count(self, fields: int, size: int) -> None:
            self._fields += fields
            self._size += size
            why = header_refusal(self._fields, self._size, self.read_limits)
            if why is not None:
                self._refusal = (431, f"request {why}")
                raise _Refused(why)  # httptools stops parsing; uvicorn calls send_400_response

        def _arm(self):
            self._late = self.loop.call_later(self.read_limits.read_timeout_s, self._head_late)

        def _disarm(self):
            if self._late is not None:
                self._late.cancel()
                self._late = None

        def _head_late(self):
            self._late = None
            if self.transport.is_closing() or self._lingering:
                return
            if self._began and self._in_head:
                self._refuse(408, f"request headers not received within {self.read_limits.read_timeout_s:g} s; "
                                  f"the connection is closed")
            elif not self._began:
                self.transport.close()  # a connection that never sent a byte

        def _refuse(self, status: int, message: str) -> None:
            """Answer `status` with a JSON error and close: stop writing, drop what the client still sends for
            LINGER_S (closing with unread data would reset the connection before the client reads the
            answer), then close."""
            self._disarm()
            self._lingering = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()  # a pipelined request while an answer is under way: no room to answer
                return
            body = error_json(message, None)
            phrase = http.HTTPStatus(status).phrase
            self.transport.write(b"".join([
                f"HTTP/1.1 {status} {phrase}\r\n".encode(), b"content-type: application/json\r\n",
                f"content-length: {len(body)}\r\n".encode(), b"connection: close\r\n\r\n", body]))
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return GuardedHttpToolsProtocol


def guard_server(start_server, limits: ReadLimits):
    """Wraps Ray Serve's `start_asgi_http_server(app, http_options, ...) -> (task, uvicorn.Server)`: the
    proxy's app is fronted by BodyLimit, and its server speaks the guarded protocol. The server's task is
    created but has not run when `start_server` returns, so its config is changed before it loads."""
    async def start(app, http_options, *args, **kw):
        result = await start_server(BodyLimit(app, limits), http_options, *args, **kw)
        server = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        config = getattr(server, "config", None)
        protocol = guarded_protocol(limits)
        if config is None or protocol is None:
            logger.warning("sejd: no header limits on this HTTP proxy (uvicorn with httptools not found)")
            return result
        config.http = protocol
        if getattr(config, "loaded", False):
            config.http_protocol_class = protocol
        return result
    start.sejd_read_limits = limits
    return start


def install() -> None:
    """Ray worker set-up (`worker_process_setup_hook`): in a Ray Serve HTTP proxy started after it, the
    limits of the job's environment apply. Every worker of the job runs it; only a proxy starts a server.
    Never raises: a worker whose Ray lacks the hook point keeps Ray's own behaviour (the app still
    enforces the limits on what reaches it)."""
    try:
        limits = ReadLimits.from_env()
        if limits is None:
            return
        from ray.serve._private import proxy
    except Exception as e:  # noqa: BLE001 - a set-up hook that raises would stop the worker
        logger.warning(f"sejd: read limits not installed: {type(e).__name__}: {e}")
        return
    start = getattr(proxy, "start_asgi_http_server", None)
    if start is None or getattr(start, "sejd_read_limits", None) is not None:
        return
    proxy.start_asgi_http_server = guard_server(start, limits)


def runtime_env(limits: ReadLimits) -> dict:
    """The Ray job runtime_env that puts `limits` into the HTTP proxies this job starts. The hook is
    pickled by value, so the proxy and the controller run it without importing sejd."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return {"worker_process_setup_hook": install, "env_vars": {ENV: limits.to_env()}}

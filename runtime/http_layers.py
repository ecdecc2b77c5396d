"""ASGI layers around the service's app, outermost first: request context (an id, the metrics of
every response, a JSON log line), the API key, and the body limit (counted as the body is read, so
a chunked body without Content-Length is held to it too)."""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

log = logging.getLogger("runtime.access")  # --log-json lines: `kiln serve` turns this logger on


async def _json_response(send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Gives each request an id (X-Request-ID), observes its status and latency, and with
    `log_json` logs one JSON line: id, method, path, status, latency, batch size, queue wait."""

    def __init__(self, app, metrics, log_json: bool = False):
        self.app, self.metrics, self.log_json = app, metrics, log_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        info: dict = {"request_id": rid}
        scope.setdefault("state", {})["kiln"] = info
        started = time.perf_counter()
        status = {"code": 500}  # what the client gets if the app dies before answering

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if info.get("disconnected") and status["code"] == 500:  # gone before any answer: nobody saw one
                status["code"] = 499
            seconds = time.perf_counter() - started
            self.metrics.observe(scope["path"], status["code"], seconds)
            if self.log_json and scope["path"] not in ("/healthz", "/readyz", "/metrics"):
                record = {"id": rid, "method": scope["method"], "path": scope["path"], "status": status["code"],
                          "latency_s": round(seconds, 4), "batch_size": info.get("batch_size"),
                          "queue_wait_s": round(info["queue_wait_s"], 4) if "queue_wait_s" in info else None}
                log.info(json.dumps(record))


class ApiKey:
    """With a key, every path but the probes needs `Authorization: Bearer <key>` (401 otherwise)."""

    OPEN = ("/healthz", "/readyz")

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"] not in self.OPEN:
            given = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                return await _json_response(send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                                            ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413: by Content-Length before reading, and by counting
    while reading otherwise. The app gets the body as it arrived."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _json_response(send, 413, f"the body is {int(declared)} bytes; the limit is {self.limit}")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # gone before its body arrived: nothing to answer
                scope.setdefault("state", {}).setdefault("kiln", {})["disconnected"] = True
                return
            total += len(message.get("body", b""))
            if total > self.limit:
                return await _json_response(send, 413, f"the body is over the limit of {self.limit} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

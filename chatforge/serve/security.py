"""API keys, per-key rate limits and request size limits."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

from chatforge.serve.errors import APIError, error_body

MAX_TRACKED_CLIENTS = 10_000


def client_id(key: str) -> str:
    """A stable, non-secret name for an API key (stored with feedback; the key itself never is)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyChecker:
    """Bearer-token authentication against a fixed set of keys; without keys every caller is let in."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """The caller's client id ("" when keys are off); raises a 401 APIError for a missing or wrong key."""
        if not self.enabled:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        token = token.strip().encode()
        # compare against every key, in constant time each, so timing tells nothing about which keys exist
        if not any([hmac.compare_digest(token, key) for key in self._keys]):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return client_id(token.decode())


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute on average, bursts of up to ``per_minute``."""

    def __init__(self, per_minute: float, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time of last refill)
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Spend one request of ``client``'s budget, or raise a 429 APIError saying when to retry."""
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - last) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                wait = (1 - tokens) / rate
                raise APIError(429, f"Rate limit reached: {self.per_minute:g} requests per minute. "
                                    f"Try again in {wait:.1f} s.", type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, round(wait)))})
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:  # forget clients whose bucket has refilled anyway
                full = now - self.per_minute / rate
                self._buckets = {c: b for c, b in self._buckets.items() if b[1] > full or c == client}


DRAIN_LIMIT = 16  # an oversized body is read up to this many times the limit, so the client gets its 413


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before any handler sees it.

    The body is read up front (it is small by definition) and replayed to the app; later ``receive`` calls
    go straight to the server, so handlers still see the client disconnect.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            elif size > DRAIN_LIMIT * self.max_bytes:
                break  # not worth reading on: answer now, even if the client may see the connection reset
            if not message.get("more_body", False):
                break
        # the oversized body is read (and dropped) before answering: a server that answers and closes while the
        # client is still sending makes the client see "connection reset" instead of the 413
        if size > self.max_bytes:
            await self._reject(send)
            return
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, send) -> None:
        body = json.dumps(error_body(f"request body too large: the limit is {self.max_bytes} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

"""API keys, per-key rate and concurrency limits, request size limits, and the middleware that keeps a keyless
server local: the Host allow-list (against DNS rebinding), the per-browser client id cookie, and the
security headers of every response."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.cookies import SimpleCookie

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
    """A token bucket per client: ``per_minute`` units (requests, tokens, writes) a minute on average, bursts of
    up to ``per_minute``."""

    def __init__(self, per_minute: float, clock=time.monotonic, unit: str = "requests"):
        self.per_minute = per_minute
        self.unit = unit
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time of last refill)
        self._lock = threading.Lock()

    def take(self, client: str, cost: float = 1) -> None:
        """Spend ``cost`` units of ``client``'s budget, or raise a 429 APIError saying when to retry. A cost
        above the whole budget passes on a full bucket (and empties it for longer), so it is never refused forever."""
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - last) * rate)
            need = min(cost, self.per_minute)
            if tokens < need:
                self._buckets[client] = (tokens, now)
                wait = (need - tokens) / rate
                raise APIError(429, f"Rate limit reached: {self.per_minute:g} {self.unit} per minute. "
                                    f"Try again in {wait:.1f} s.", type=self.unit, code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, round(wait)))})
            self._buckets[client] = (tokens - cost, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:  # forget clients whose bucket has refilled anyway
                full = now - self.per_minute / rate
                self._buckets = {c: b for c, b in self._buckets.items() if b[1] > full or c == client}


class ConcurrencyLimit:
    """At most ``limit`` requests of one client running at once (a 429 past that)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str):
        """Count one more running request of ``client``; returns the function that ends it (call it once)."""
        with self._lock:
            if self._running.get(client, 0) >= self.limit:
                raise APIError(429, f"Too many requests at once: at most {self.limit} may run per client.",
                               type="requests", code="too_many_concurrent_requests", headers={"Retry-After": "1"})
            self._running[client] = self._running.get(client, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._running[client] -= 1
                    if not self._running[client]:
                        del self._running[client]
        return release


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
CLIENT_COOKIE = "chatforge_client"


def browser_id(cookie: str) -> str:
    """The stored client id of a browser's cookie value (the cookie itself is never stored)."""
    return "browser-" + hashlib.sha256(cookie.encode()).hexdigest()[:16]


def host_name(host_header: str) -> str:
    """The name part of a Host header ("[::1]:8000" -> "[::1]", "localhost:80" -> "localhost")."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalGuard:
    """ASGI middleware of every HTTP request: a Host header outside ``allowed_hosts`` is a 400 (a page
    of another site that rebinds its name to 127.0.0.1 sends its own name); without API keys, each browser
    gets a random client id cookie (``scope["state"]["client_id"]``) that keeps its conversations apart from
    everyone else's; every response gets the security headers (CSP, no framing, no sniffing)."""

    HEADERS = [(b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                           b"form-action 'self'; object-src 'none'"),
               (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]

    def __init__(self, app, allowed_hosts: list[str], cookies: bool):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {h.lower() for h in allowed_hosts}
        self.cookies = cookies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1").lower())
        extra = list(self.HEADERS)
        if not self.any_host and host not in self.allowed:
            body = json.dumps(error_body(f"the Host header {host!r} is not one this server answers to (see its "
                                         "--allowed_hosts option)", code="host_not_allowed")).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())] + extra})
            await send({"type": "http.response.body", "body": body})
            return
        if self.cookies:
            cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1")).get(CLIENT_COOKIE)
            value = cookie.value if cookie is not None and len(cookie.value) == 32 else None
            if value is None:
                value = secrets.token_hex(16)
                extra.append((b"set-cookie", f"{CLIENT_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; "
                                             f"Max-Age=31536000".encode()))
            scope.setdefault("state", {})["client_id"] = browser_id(value)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, with_headers)


DRAIN_LIMIT = 16  # an oversized body is read up to this many times the limit, so the client gets its 413


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before any handler sees it.

    The body is read up front (it is small by definition) and replayed to the app; later ``receive`` calls
    go straight to the server, so handlers still see the client disconnect.
    """

    def __init__(self, app, max_bytes: int, timeout: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):  # a client trickling its body holds a socket: not for long
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
        except TimeoutError:
            await self._reject(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                               "request_timeout")
            return
        # the oversized body is read (and dropped) before answering: a server that answers and closes while the
        # client is still sending makes the client see "connection reset" instead of the 413
        if size > self.max_bytes:
            await self._reject(send, 413, f"request body too large: the limit is {self.max_bytes} bytes",
                               "request_too_large")
            return
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

"""Running the app with uvicorn: in the foreground (``chatforge serve``) or in a background thread on a
free localhost port (tests, benchmarks).

Slow clients are cut: a connection must send its request headers within ``header_timeout`` (an idle socket
or one trickling headers is closed), its body within ``body_timeout`` (a 408, ``BodySizeLimit``), and may
sit idle between requests for ``keep_alive_timeout``; past ``max_connections`` open connections new
requests get a 503. These bound what one machine's clients can hold; on the internet, put a reverse proxy
(nginx, Caddy) in front as well, which buffers slow clients and terminates TLS.
"""

from __future__ import annotations

import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.serve.security import is_loopback


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers, counted from the connection's start
    or from the first byte of a request on a kept-alive connection."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _config(app, log_level: str) -> uvicorn.Config:
    options = getattr(app.state, "options", None)
    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout": getattr(options, "header_timeout", 10.0)})
    # h11 sends disconnects to the app as http.disconnect, which is how a stream learns its client left
    return uvicorn.Config(app, http=protocol, ws="none", lifespan="off", log_level=log_level,
                          timeout_graceful_shutdown=2, timeout_keep_alive=getattr(options, "keep_alive_timeout", 5),
                          limit_concurrency=getattr(options, "max_connections", None))


def check_listen(host: str, port: int, keyed: bool, insecure: bool) -> None:
    """Refuse a port outside 1..65535, and a keyless server on an address other machines reach (unless
    ``insecure``): without keys anyone who reaches the port would use the model and read the feedback."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"option 'port' must be in 1..65535; got {port}")
    if not keyed and not is_loopback(host) and not insecure:
        raise ConfigError(f"refusing to listen on {host} without API keys: anyone who reaches it could use the "
                          "model and read every conversation. Give --api_keys_file (or --api_keys), listen on "
                          "127.0.0.1, or pass --insecure if the network is yours alone.")


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    config = _config(app, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()


class BackgroundServer:
    """``with BackgroundServer(app) as server: requests to server.url``; stops the server on exit."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(_config(app, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="chatforge-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ChatforgeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

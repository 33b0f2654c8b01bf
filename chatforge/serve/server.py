"""Running the app with uvicorn: in the foreground (``chatforge serve``) or in a background thread on a
free localhost port (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from chatforge.errors import ChatforgeError


def _config(app, log_level: str) -> uvicorn.Config:
    # h11 sends disconnects to the app as http.disconnect, which is how a stream learns its client left
    return uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_level=log_level,
                          timeout_graceful_shutdown=2)


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

"""uvicorn in a thread of the node: started by ``Node.start(http=True)``, stopped with it."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from node.http.app import create_app

if TYPE_CHECKING:
    from node.app import Node

log = logging.getLogger(__name__)


class HttpServer:
    """The HTTP server of one node, on ``[http] host``:``port`` (HTTPS with ``tls``)."""

    def __init__(self, node: Node) -> None:
        s = node.settings.http
        self.address = f"{s.host}:{s.port}"
        self.scheme = "https" if s.tls else "http"
        self.app = create_app(node.service, s)
        config = uvicorn.Config(
            self.app, host=s.host, port=s.port, log_config=None, lifespan="off", server_header=False, proxy_headers=False,
            ssl_certfile=str(s.tls.certificate) if s.tls else None, ssl_keyfile=str(s.tls.private_key) if s.tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            pass

    def start(self, timeout_s: float = 20.0) -> None:
        """Listen, or raise RuntimeError when the address cannot be bound in time."""
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server could not listen on {self.address} (in use? see [http] host and port)")
            time.sleep(0.02)
        log.info("HTTP API and dashboard on %s://%s", self.scheme, self.address)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(15)
            self.thread = None

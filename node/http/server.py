"""uvicorn in a thread of the node: started by ``Node.start(http=True)``, stopped with it.

uvicorn (0.54) bounds neither the connections it holds nor the time a request's headers
take: a client that opens connections and sends half a request line, or a byte now and
then, keeps each open for ever. Every one costs the node's process a file descriptor, and
that process also receives DICOM (it shares the port with the receivers), reads the spool
and writes the database: measured, 300 such connections under a limit of 256 descriptors
made the node answer no association and log ``Too many open files`` 77 000 times in 90 s.
:class:`BoundedH11Protocol` closes a connection whose request head is not complete within
``HEADER_TIMEOUT_S`` (from its opening, or from the previous response), one whose body
stalls for ``BODY_IDLE_S``, one that stops reading its answer for ``SEND_STALL_S``, and
every connection beyond ``max_connections()``; the
listen backlog (which is also how many connections asyncio accepts in one go) is
``ACCEPT_BACKLOG``.

With ``[http] tls`` the handshake is the protocol's too: uvicorn hands asyncio the TLS
context, and asyncio gives a handshake 60 s while the protocol (and so the cap) sees the
connection only once it is done: a client sending no ClientHello held a descriptor for a
minute, uncounted. Here uvicorn serves plain TCP; the protocol counts the connection at
once, upgrades it with asyncio's public ``loop.start_tls`` (TLS context from
``node.tls``, BCP 195) within ``HANDSHAKE_TIMEOUT_S``, then serves HTTP on the
encrypted transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from node import tls
from node.http.app import create_app

if TYPE_CHECKING:
    from node.app import Node

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # seconds for a TLS handshake ([http] tls), from the connection's start
HEADER_TIMEOUT_S = 10.0  # seconds for a request line and headers (browsers send them in one packet)
BODY_IDLE_S = 30.0  # seconds a request body may pause between two reads
SEND_STALL_S = 30.0  # seconds an answer may wait for the client to read (the connection's send buffer full)
CONNECTION_CAP = 256  # open HTTP connections at most (also at most a quarter of the descriptor limit)
# asyncio accepts up to the listen backlog in one go before any connection_made runs
# (uvicorn's default 2048: a burst of 300 connections took every descriptor at once).
ACCEPT_BACKLOG = 64


def max_connections() -> int:
    """Open HTTP connections allowed at once: ``CONNECTION_CAP``, and never more than a
    quarter of this process's file-descriptor limit (the rest is for DICOM, spool, database)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, min(CONNECTION_CAP, soft // 4)) if soft != resource.RLIM_INFINITY else CONNECTION_CAP


class _Early(asyncio.Protocol):
    """Holds what arrives on a TLS connection between the end of its handshake and the
    moment the HTTP protocol takes it over (the client's first request, usually)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep the transport open for the answer; HTTP decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head, an idle limit on its
    body and a cap on open connections (see the module's docstring). Overrides uvicorn's
    ``connection_made``, ``data_received``, ``on_response_complete``, ``connection_lost``,
    ``pause_writing`` and ``resume_writing`` (tests/test_attack_http.py fails when they
    change)."""

    _timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    # With [http] tls, HttpServer sets these on a subclass: the server's TLS context and
    # the connections still in their handshake (counted towards the cap).
    tls_context: ssl.SSLContext | None = None
    handshaking: set[BoundedH11Protocol] = set()
    _in_handshake = False
    _secured = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls_context is not None and not self._secured:
            self._start_tls(transport)
            return
        super().connection_made(transport)
        if len(self.connections) + len(self.handshaking) > max_connections():
            transport.abort()  # no answer: what a full listen backlog would do, at no cost
            return
        self._arm(HEADER_TIMEOUT_S)

    def _start_tls(self, transport: asyncio.Transport) -> None:
        """Count a new TCP connection, then upgrade it to TLS within HANDSHAKE_TIMEOUT_S
        (closed at once beyond the cap, or when the handshake fails or is late)."""
        if len(self.connections) + len(self.handshaking) >= max_connections():
            transport.abort()
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer that start_tls puts in between
        self._in_handshake = True
        self.handshaking.add(self)
        self.loop.create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        early = _Early()  # what the TLS layer delivers between the handshake and this task's turn
        try:
            secured = await self.loop.start_tls(transport, early, self.tls_context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):  # failed, late, or closed meanwhile
            secured = None
        finally:
            self.handshaking.discard(self)
        if secured is None or secured.is_closing() or early.lost:
            transport.abort()
            return
        self._in_handshake, self._secured = False, True
        secured.set_protocol(self)
        self.connection_made(secured)  # counted as an HTTP connection from here
        for chunk in early.chunks:
            if self.transport.is_closing():
                return
            self.data_received(chunk)
        if early.eof and not self.transport.is_closing():
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:
            self._arm(BODY_IDLE_S)
        elif self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request is in; the application answers in its own time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm(HEADER_TIMEOUT_S)  # the next request on this connection (keep-alive)

    def pause_writing(self) -> None:
        """The connection's send buffer is full (the client reads no more): it has
        ``SEND_STALL_S`` to start reading again. A client that pipelines requests for an
        answer larger than the buffers (the API schema, anonymously) and never reads held
        its connection for good, no deadline running while an answer is being written:
        256 of them took every place (``max_connections``), health probes included."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(SEND_STALL_S, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _not_reading(self) -> None:
        self._send_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._in_handshake:  # the TLS layer (or the socket) closed before HTTP began
            self.handshaking.discard(self)
            return
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        """(Re)start the deadline."""
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.abort()


def _bind_error(host: str, port: int) -> str:
    """Why ``host``:``port`` cannot be listened on now, as far as a bind of our own
    tells (the server has already stopped, so its reason is gone with it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"the host cannot be resolved: {exc.strerror or type(exc).__name__}"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return {errno.EADDRINUSE: "in use by another program", errno.EADDRNOTAVAIL: "not an address of this machine",
                    errno.EACCES: "a port below 1024 needs privileges"}.get(exc.errno, exc.strerror or type(exc).__name__)
    return "it stopped at start; the error logged above says why"


class WithoutUvicornStartLine(logging.Filter):
    """Drops uvicorn's "Uvicorn running on http://..." record. uvicorn serves plain TCP
    here even for ``[http] tls`` (the protocol adds TLS), so that line said ``http://``
    for an HTTPS server; the node logs its own line with the right scheme
    (:meth:`HttpServer.start`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Uvicorn running on ")


def _drop_uvicorn_start_line() -> None:
    """Install :class:`WithoutUvicornStartLine` on uvicorn's logger, once."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, WithoutUvicornStartLine) for f in logger.filters):
        logger.addFilter(WithoutUvicornStartLine())


class HttpServer:
    """The HTTP server of one node, on ``[http] host``:``port`` (HTTPS with ``tls``)."""

    def __init__(self, node: Node) -> None:
        s = node.settings.http
        self.address = f"{s.host}:{s.port}"
        self.scheme = "https" if s.tls else "http"
        self.app = create_app(node.service, s)
        self.tls = s.tls
        protocol = self.protocol = BoundedH11Protocol
        if s.tls:  # the context is loaded by start(), which reports a file it cannot read
            protocol = self.protocol = type("BoundedTlsH11Protocol", (BoundedH11Protocol,), {"handshaking": set()})
        config = uvicorn.Config(
            self.app, host=s.host, port=s.port, log_config=None, lifespan="off", server_header=False, proxy_headers=False,
            http=protocol, ws="none", backlog=ACCEPT_BACKLOG, access_log=False,  # node.http.app.AccessLog logs routes, not URLs
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        _drop_uvicorn_start_line()

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            pass

    def start(self, timeout_s: float = 20.0) -> None:
        """Listen, or raise RuntimeError saying what is known: the ``[http] tls``
        certificate or key cannot be loaded; the server stopped at start (its bind error,
        logged by uvicorn just before, is named: in use, not this machine's address, not
        permitted); or it was still starting after ``timeout_s`` (a busy machine: nothing
        says the port is taken)."""
        if self.tls is not None:
            try:
                self.protocol.tls_context = tls.server_context(self.tls.certificate, self.tls.private_key, None, False)
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeError(f"[http] tls: cannot load the certificate or its private key ({getattr(exc, 'strerror', None) or type(exc).__name__}): "
                                   "give PEM files the node can read") from None
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the HTTP server could not listen on {self.address} ({_bind_error(self.server.config.host, self.server.config.port)}; "
                                   "see [http] host and port)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.address} was still starting after {timeout_s:g} s (a busy machine? "
                                   "nothing said the address is taken); start the node again")
            time.sleep(0.02)
        log.info("HTTP API and dashboard on %s://%s", self.scheme, self.address)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(15)
            self.thread = None

"""Hostile input against the day's changes outside the de-identifier (docs/security.md,
ninth attack): the mapping CSV's formula guard, the group commit's statements on the
DBAPI cursor, `config check --destinations`. Synthetic values only."""

from __future__ import annotations

import csv
import io

import pytest

from node.mapping import csv_cell, csv_text

# Each would be run by some spreadsheet: a formula character after what a spreadsheet
# drops or trims first, after a control character (OWASP ASVS 5.0 1.2.10 names NUL), or
# in its fullwidth form (read as '=' by spreadsheets in East Asian locales).
HIDDEN_FORMULAS = [
    "\x00=HYPERLINK(\"http://198.51.100.7/x\",\"open\")",
    "\n=1+1",
    " =1+1",
    "\u00a0@SUM(1)",
    "\u200b=1+1",
    "\ufeff=1+1",
    "\u2060+1+2",
    "\uff1dHYPERLINK(\"http://198.51.100.7/x\")",
    "\uff0b1\uff0b2",
    "\uff20SUM(1)",
    "\x0b-1+1",
]


@pytest.mark.parametrize("value", HIDDEN_FORMULAS, ids=repr)
def test_a_formula_behind_invisible_or_fullwidth_characters_is_quoted(value):
    """Before: only a value whose very first character was = + - @ tab CR or ' was
    quoted; each of these was written as it came."""
    cell = csv_cell(value)
    assert cell == "'" + value
    row = next(csv.reader(io.StringIO(csv_text(["v"], [[value]]).split("\r\n", 1)[1])))
    assert row == ["'" + value] and row[0][1:] == value  # one quote dropped: the value back


@pytest.mark.parametrize("value", ["SYN-0002", "Synthetic^Patient", " SYN 1", "O'Brien", "-12", "+3", "a\n=1+1", "", "ÄLVSBY^ANNA"])
def test_ordinary_values_are_written_as_they_are(value):
    """The guard changes nothing else: a hyphen inside, a leading space before a letter,
    a whole number, a newline inside a value (the CSV quotes the cell whole)."""
    assert csv_cell(value) == value


@pytest.fixture
def endless_http():
    """A loopback HTTP server answering every request 200 with a body that never ends
    (1 MiB chunks, some 20 MiB/s); its port. Stopped (every connection closed) after."""
    import socket
    import threading
    import time

    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)

    def serve(conn: socket.socket) -> None:
        chunk = b"x" * (1 << 20)
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nTransfer-Encoding: chunked\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    time.sleep(0.05)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join()
    server.close()


def test_a_destination_answering_an_endless_body_does_not_hold_the_health_check(endless_http):
    """`config check --destinations` (and the running node's health check, every
    interval_s) asked a dicomweb destination's QIDO-RS and read the answer whole: a
    server answering an endless body held it for ever (measured: `casemask config check
    --destinations` at 4.5 GB resident after 20 s, killed by timeout). Only the status
    matters: the probe answers within seconds, the body unread."""
    import threading

    from node.config import Destination
    from node.health import probe

    dest = Destination(name="web", kind="dicomweb", url=f"http://127.0.0.1:{endless_http}/dicom-web")
    result = []
    t = threading.Thread(target=lambda: result.append(probe(dest, "CASEMASK", timeout_s=5.0, stow=False)), daemon=True)
    t.start()
    t.join(10)
    assert result, "the probe was still reading the answer after 10 s"
    assert result[0].reachable and "QIDO-RS answered HTTP 200" in result[0].detail

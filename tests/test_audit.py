"""The audit trail: append-only, DICOM audit messages valid against the PS3.15 A.5 /
RFC 3881 schema, sent to syslog collectors (UDP and TCP) that the tests start on
loopback; accounts and tokens from the CLI; failed logins audited and rate-limited."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from node import audit
from tests.conftest import PHI, ROOT, STORESCU, dcmtk_env, free_port, make_study, needs_dcmtk, node_config, wait_until, write_toml
from tests.httpnode import http_nodes, start_http_node  # noqa: F401 (fixture)

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parent / "data" / "dicom_audit_message.rng")))
# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
RFC5424 = re.compile(rb"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z) (\S{1,255}) (\S{1,48}) (\S{1,128}) (\S{1,32}) (-|\[.*?\]) (.*)$", re.S)


class SyslogReceiver:
    """A syslog collector on loopback: UDP datagrams, or TCP with octet counting."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.messages: list[bytes] = []
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        # Outside the ephemeral range (free_port): a test stops it and binds the port again
        # later, and meanwhile the node's own connection attempts to it must not be able
        # to take the port (as their source port) or connect to themselves.
        self.sock.bind(("127.0.0.1", free_port()))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        if transport == "tcp":
            self.sock.listen(4)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.transport == "udp":
                    data, _ = self.sock.recvfrom(65535)
                    self.messages.append(data)
                    continue
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            threading.Thread(target=self._read_frames, args=(conn,), daemon=True).start()

    def _read_frames(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except (TimeoutError, socket.timeout):
                    continue
                if not chunk:
                    return
                buf += chunk
                while (m := re.match(rb"(\d+) ", buf)) and len(buf) >= m.end() + int(m.group(1)):
                    end = m.end() + int(m.group(1))
                    self.messages.append(buf[m.end():end])
                    buf = buf[end:]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def parse_syslog(msg: bytes) -> tuple[int, bytes, etree._Element]:
    m = RFC5424.match(msg)
    assert m, msg[:200]
    assert m.group(6) == b"IHE+RFC-3881" and m.group(4) == b"casemask"
    body = m.group(8)
    assert body.startswith(b"\xef\xbb\xbf"), "MSG is UTF-8 with a BOM (RFC 5424 6.4)"
    return int(m.group(1)), m.group(6), etree.fromstring(body[3:])


def test_schema_refuses_a_malformed_message():
    """The schema used below is not vacuous: a message without its date or with an
    unknown outcome fails it."""
    good = b'<AuditMessage><EventIdentification EventActionCode="E" EventDateTime="2024-01-01T00:00:00Z" EventOutcomeIndicator="0"><EventID csd-code="110100" codeSystemName="DCM" originalText="Application Activity"/></EventIdentification><ActiveParticipant UserID="X" UserIsRequestor="true"/><AuditSourceIdentification AuditSourceID="X"/></AuditMessage>'
    assert SCHEMA.validate(etree.fromstring(good))
    assert not SCHEMA.validate(etree.fromstring(good.replace(b' EventDateTime="2024-01-01T00:00:00Z"', b"")))
    assert not SCHEMA.validate(etree.fromstring(good.replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"')))
    assert not SCHEMA.validate(etree.fromstring(good.replace(b'<ActiveParticipant UserID="X" UserIsRequestor="true"/>', b"")))


@needs_dcmtk
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_audit_messages_reach_the_syslog_collector_and_validate(tmp_path, http_nodes, transport):
    receiver = SyslogReceiver(transport)
    try:
        raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
        raw["audit"] = {"site": "Radiology", "syslog_host": "127.0.0.1", "syslog_port": receiver.port, "syslog_transport": transport}
        hn = start_http_node(raw, tmp_path)
        http_nodes.append(hn)
        r = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "CASEMASK", "127.0.0.1", str(hn.node.settings.node.port), *map(str, make_study(tmp_path / "s", 3))],
                           env=dcmtk_env(), capture_output=True, timeout=60)
        assert r.returncode == 0
        subprocess.run([STORESCU, "-aet", "INTRUDER", "-aec", "CASEMASK", "127.0.0.1", str(hn.node.settings.node.port), str(make_study(tmp_path / "t", 1)[0])],
                       env=dcmtk_env(), capture_output=True, timeout=60)

        def events() -> list[str]:
            return [parse_syslog(m)[2].find("EventIdentification/EventID").get("originalText") for m in receiver.messages]

        wait_until(lambda: {"DICOM Instances Transferred", "DICOM Instances Accessed", "Security Alert", "Application Activity"} <= set(events()),
                   timeout=60, what="received, de-identified, association and start messages at the collector")
        wait_until(lambda: sum(1 for e in hn.client("viewer").get("/api/v1/audit").json() if e["event"] == "sent") >= 1, what="the sent entry")
        wait_until(lambda: len(receiver.messages) >= len(hn.client("viewer").get("/api/v1/audit", params={"limit": 1000}).json()), timeout=30,
                   what="every entry at the collector")
        study_uid = hn.client("viewer").get("/api/v1/studies").json()[0]["study_uid"]
        seen = set()
        for msg in receiver.messages:
            pri, _, doc = parse_syslog(msg)
            assert SCHEMA.validate(doc), SCHEMA.error_log
            outcome = doc.find("EventIdentification").get("EventOutcomeIndicator")
            assert pri == (85 if outcome == "0" else 84)  # authpriv.notice / authpriv.warning
            assert doc.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "Radiology"
            for po in doc.iter("ParticipantObjectIdentification"):
                if po.find("ParticipantObjectIDTypeCode").get("originalText") == "Study Instance UID":
                    assert po.get("ParticipantObjectID") == study_uid  # pseudonymous, as the archive has it
                    seen.add(doc.find("EventIdentification/EventID").get("originalText"))
            text = msg.decode("utf-8", "replace") + "".join(base64.b64decode(d.get("value")).decode() for d in doc.iter("ParticipantObjectDetail"))
            for value in PHI.values():
                assert value not in text
        assert {"DICOM Instances Transferred", "DICOM Instances Accessed"} <= seen
        rejected = [parse_syslog(m)[2] for m in receiver.messages if b"INTRUDER" in m]
        assert rejected and rejected[0].find("EventIdentification").get("EventOutcomeIndicator") == "4"
        assert "not in [[sources]]" in rejected[0].findtext("EventIdentification/EventOutcomeDescription")
        # The export of the same trail validates too, and is itself recorded.
        xml = hn.client("admin").get("/api/v1/audit/export").content
        doc = etree.fromstring(xml)
        assert doc.tag == "AuditMessages" and len(doc) >= 5
        assert SCHEMA.validate(doc), SCHEMA.error_log
        assert hn.client("viewer").get("/api/v1/audit/export").status_code == 403
        assert hn.client("viewer").get("/api/v1/audit", params={"event": "audit-exported"}).json()[0]["actor"] == "token:test-admin"
    finally:
        receiver.stop()


def test_collector_down_then_up_gets_every_entry(tmp_path, http_nodes):
    """The forwarder keeps a cursor in the database: entries written while the TCP
    collector was away are sent when it is back."""
    receiver = SyslogReceiver("tcp")
    port = receiver.port
    receiver.stop()  # nobody listens on that port now
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["audit"] = {"syslog_host": "127.0.0.1", "syslog_port": port, "syslog_transport": "tcp"}
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    assert hn.client("operator").post("/api/v1/deliveries/retry").status_code == 200  # a second entry

    def pending() -> int:
        with hn.node.sessions() as s:
            return audit.pending(s)

    wait_until(lambda: pending() >= 2, what="entries waiting for the collector")
    receiver = SyslogReceiver.__new__(SyslogReceiver)
    receiver.transport, receiver.messages = "tcp", []
    receiver.sock = socket.socket()
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    receiver.sock.bind(("127.0.0.1", port))
    receiver.sock.listen(4)
    receiver.sock.settimeout(0.2)
    receiver.port, receiver._stop = port, threading.Event()
    receiver.thread = threading.Thread(target=receiver._serve, daemon=True)
    receiver.thread.start()
    try:
        wait_until(lambda: pending() == 0, timeout=30, what="the backlog sent")
        wait_until(lambda: len(receiver.messages) >= 2, what="the backlog at the collector")
    finally:
        receiver.stop()


def test_the_trail_is_append_only(tmp_path):
    from node.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    from node.db import make_sessionmaker

    sessions = make_sessionmaker(engine)
    assert audit.record_now(sessions, "node-started", actor="CASEMASK")
    for stmt in ("UPDATE audit_events SET actor = 'someone else'", "DELETE FROM audit_events"):
        with pytest.raises(IntegrityError, match="append-only"), engine.begin() as conn:
            conn.execute(text(stmt))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT actor FROM audit_events")).scalar() == "CASEMASK"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_accounts_tokens_and_rate_limited_audited_logins(tmp_path, http_nodes):
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["http"]["login_attempts"] = 3
    cfg = write_toml(raw, tmp_path / "cli.toml")
    r = cli("user", "add", "alice", "--role", "operator", "--config", str(cfg), stdin="correct horse battery\n")
    assert r.returncode == 0, r.stderr
    assert cli("user", "add", "bob", "--role", "viewer", "--config", str(cfg), stdin="short\n").returncode == 2
    assert cli("user", "add", "alice", "--role", "admin", "--config", str(cfg), stdin="another long one\n").returncode == 2  # exists
    tok = cli("token", "create", "--name", "prometheus", "--role", "viewer", "--config", str(cfg))
    assert tok.returncode == 0 and tok.stdout.startswith("cm_") and "shown once" in tok.stderr
    token = tok.stdout.strip()
    assert "prometheus" in cli("token", "list", "--config", str(cfg)).stdout and token not in cli("token", "list", "--config", str(cfg)).stdout
    with open(tmp_path / "var" / "casemask.db", "rb") as f:
        db = f.read()
    assert token.encode() not in db and b"correct horse battery" not in db  # only hashes are stored

    hn = start_http_node(raw, tmp_path, name="cli2.toml")
    http_nodes.append(hn)
    c = hn.client()
    assert c.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    def login(password: str):
        page = c.get("/login")
        tok = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
        return c.post("/login", data={"name": "alice", "password": password, "login_token": tok, "next": "/"}, follow_redirects=False)

    assert [login("wrong password").status_code for _ in range(3)] == [401, 401, 401]
    assert login("correct horse battery").status_code == 429  # locked for the window, even with the right password
    entries = hn.client("viewer").get("/api/v1/audit", params={"event": "login"}).json()
    assert [e["outcome"] for e in entries] == [4, 4, 4, 4] and all(e["actor"] == "alice" and e["host"] == "127.0.0.1" for e in entries)
    assert "too many" in entries[0]["detail"]["reason"]
    # Revoked tokens stop working at once.
    assert cli("token", "revoke", "prometheus", "--config", str(cfg)).returncode == 0
    assert c.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    created = hn.client("viewer").get("/api/v1/audit", params={"event": "account-changed"}).json()
    assert {e["detail"]["action"] for e in created} == {"added", "created", "revoked"} and all(e["actor"].startswith("cli:") for e in created)


def test_cli_status_retry_and_export_use_the_service_layer(tmp_path):
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    cfg = write_toml(raw, tmp_path / "n.toml")
    assert cli("db", "upgrade", "--config", str(cfg)).returncode == 0  # the node's first start (status refuses to make a database)
    r = cli("status", "--json", "--config", str(cfg))
    assert r.returncode == 0 and '"throughput"' in r.stdout and '"disk_free_bytes"' in r.stdout
    assert cli("retry", "--destination", "nowhere", "--config", str(cfg)).returncode == 2
    assert cli("retry", "--quarantined", "--config", str(cfg)).stdout.startswith("re-queued 0 failed or waiting deliveries, 0 quarantined jobs")
    out = tmp_path / "mapping"
    assert cli("export-mapping", "--out", str(out), "--config", str(cfg)).returncode == 0
    assert (out / "uids.csv").stat().st_mode & 0o077 == 0
    from node.config import load
    from node.service import Service

    entries = Service.open(load(cfg)).audit(audit.Filter())
    assert [e["event"] for e in entries] == ["mapping-exported", "deliveries-retried"]  # the refused retry changed nothing


def test_cli_disables_a_user_at_once_and_replace_lets_them_in_again(tmp_path, http_nodes):
    """An admin had no way to lock out someone who left: the users table had a disabled
    flag that logins honoured, and no command set it."""
    raw = node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    cfg = write_toml(raw, tmp_path / "cli.toml")
    assert cli("user", "add", "dora", "--role", "operator", "--config", str(cfg), stdin="correct horse battery\n").returncode == 0
    hn = start_http_node(raw, tmp_path, name="cli2.toml")
    http_nodes.append(hn)
    c = hn.client()

    def login(password: str) -> int:
        page = c.get("/login")
        tok = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
        return c.post("/login", data={"name": "dora", "password": password, "login_token": tok, "next": "/"}, follow_redirects=False).status_code

    assert login("correct horse battery") == 303 and c.get("/studies", follow_redirects=False).status_code == 200
    r = cli("user", "disable", "dora", "--config", str(cfg))
    assert r.returncode == 0 and "disabled" in r.stdout, r.stderr
    assert c.get("/studies", follow_redirects=False).status_code == 303  # the open session ended
    assert login("correct horse battery") == 401
    assert "disabled" in cli("user", "list", "--config", str(cfg)).stdout
    assert cli("user", "disable", "nobody", "--config", str(cfg)).returncode == 2
    assert cli("user", "add", "dora", "--role", "viewer", "--replace", "--config", str(cfg), stdin="a new long passphrase\n").returncode == 0
    assert login("a new long passphrase") == 303
    changes = hn.client("viewer").get("/api/v1/audit", params={"event": "account-changed"}).json()
    assert [e["detail"]["action"] for e in changes if e["object_ref"] == "dora"][:2] == ["replaced", "disabled"]  # newest first


def test_an_entry_committed_after_a_later_one_still_reaches_the_collector(pg_database, monkeypatch):
    """PostgreSQL hands out ids at insert, not at commit: an entry (an association
    record, say) whose transaction commits after a later entry's must still be sent,
    not passed over by the cursor. A gap left by a rolled-back entry is passed over once
    audit.GAP_WAIT_S has gone by."""
    from node.db import make_engine, make_sessionmaker

    engine = make_engine(pg_database, 4, 0)
    sessions = make_sessionmaker(engine)
    receiver = SyslogReceiver("tcp")
    sender = audit.SyslogSender("127.0.0.1", receiver.port, "tcp")
    source = audit.Source("CASEMASK")

    def actors() -> list[str]:
        return [parse_syslog(m)[2].find("ActiveParticipant").get("UserID") for m in receiver.messages]

    try:
        slow = sessions()
        audit.record(slow, "login", actor="early", actor_kind="user")
        slow.flush()  # its id is taken; its transaction is still open
        audit.record_now(sessions, "login", actor="late", actor_kind="user")
        assert audit.forward(sessions, sender, source, None) == 0  # "late" waits for the id before it
        slow.commit()
        slow.close()
        assert audit.forward(sessions, sender, source, None) == 2
        wait_until(lambda: len(receiver.messages) == 2, what="both entries at the collector")
        assert actors() == ["early", "late"]  # oldest first, from a new cursor too
        assert audit.forward(sessions, sender, source, None) == 0  # and not again
        # A rolled-back entry leaves a gap for good: the next one goes once GAP_WAIT_S passed.
        with sessions() as gone:
            audit.record(gone, "login", actor="rolled-back", actor_kind="user")
            gone.flush()
            gone.rollback()
        audit.record_now(sessions, "login", actor="after-the-gap", actor_kind="user")
        assert audit.forward(sessions, sender, source, None) == 0
        monkeypatch.setattr(audit, "GAP_WAIT_S", 0.0)
        assert audit.forward(sessions, sender, source, None) == 1
        wait_until(lambda: len(receiver.messages) == 3, what="the entry after the gap")
        assert actors()[-1] == "after-the-gap"
    finally:
        sender.close()
        receiver.stop()
        engine.dispose()

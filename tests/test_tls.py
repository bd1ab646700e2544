"""DICOM TLS (PS3.15 B.9, BCP 195) with real peers: dcmtk echoscu/storescu +tls against
the node, the node forwarding to Orthanc over DICOM TLS, and DICOMweb over HTTPS with
authentication. Certificates are made by each test (tests/pki.py)."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.db import Delivery, Instance
from tests.conftest import DICOMWEB_PLUGIN, ECHOSCU, ORTHANC, STORESCU, Orthanc, dcmtk_env, free_port, make_study, needs_dcmtk, needs_dicomweb, needs_orthanc, node_config, wait_logged, wait_until
from tests.pki import CA

pytestmark = needs_dcmtk


@pytest.fixture
def pki(tmp_path):
    """A CA, the node's server certificate, a client certificate it signed, and one from
    a CA nobody trusts."""
    ca = CA(tmp_path / "pki")
    rogue = CA(tmp_path / "rogue", name="rogue CA")
    return {
        "ca": ca,
        "node": ca.issue("casemask-node", server=True, client=True),
        "modality": ca.issue("modality-1", client=True),
        "untrusted": rogue.issue("intruder", client=True),
        "archive": ca.issue("archive", server=True, client=True),
        "rogue": rogue,
    }


def tls_node(tmp_path, start_node, pki, plain: bool = True, **node_kw):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, **node_kw)
    if not plain:
        raw["node"]["port"] = 0
    raw["node"]["tls"] = {
        "port": free_port(),
        "certificate": str(pki["node"].cert),
        "private_key": str(pki["node"].key),
        "ca_certificates": str(pki["ca"].pair.cert),
        "require_client_certificate": True,
    }
    return start_node(raw, schedule=False)


def dcmtk(tool: str, port: int, *tls: str, files: list[Path] = (), aet: str = "MODALITY1") -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-aet", aet, "-aec", "CASEMASK", *tls, "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def client_tls(pki, who: str = "modality") -> tuple[str, ...]:
    return ("+tls", str(pki[who].key), str(pki[who].cert), "+cf", str(pki["ca"].pair.cert))


def test_tls_listener_accepts_a_signed_client_and_refuses_the_others(tmp_path, start_node, pki, caplog):
    caplog.set_level(logging.INFO, logger="node")
    node = tls_node(tmp_path, start_node, pki)
    port = node.settings.node.tls.port
    ok = dcmtk(ECHOSCU, port, *client_tls(pki))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # (from a receiver process, its log lines come through a pipe a moment later)
    assert "certificate O=casemask tests,CN=modality-1" in wait_logged(caplog, "certificate O=casemask tests,CN=modality-1"), "the client certificate's subject is logged with the association"
    stored = dcmtk(STORESCU, port, *client_tls(pki), files=make_study(tmp_path / "in", 3))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 3
    # No client certificate (anonymous TLS), an untrusted one, or no TLS at all: refused.
    anonymous = dcmtk(ECHOSCU, port, "+tla", "+cf", str(pki["ca"].pair.cert))
    assert anonymous.returncode != 0
    untrusted = dcmtk(ECHOSCU, port, "+tls", str(pki["untrusted"].key), str(pki["untrusted"].cert), "+cf", str(pki["ca"].pair.cert))
    assert untrusted.returncode != 0
    plain_to_tls = dcmtk(ECHOSCU, port)
    assert plain_to_tls.returncode != 0
    wait_logged(caplog, "handshake failed", 3)  # three failed handshakes logged
    # A client that does not trust the node's certificate gives up by itself.
    wrong_ca = dcmtk(ECHOSCU, port, "+tls", str(pki["modality"].key), str(pki["modality"].cert), "+cf", str(pki["rogue"].pair.cert))
    assert wrong_ca.returncode != 0
    # The plain listener still answers beside it.
    assert dcmtk(ECHOSCU, node.settings.node.port).returncode == 0


def test_plain_listener_off_and_a_stalled_handshake_blocks_nobody(tmp_path, start_node, pki):
    node = tls_node(tmp_path, start_node, pki, plain=False, acse_timeout_s=30.0)  # the handshake's timeout
    assert node.settings.node.port == 0
    port = node.settings.node.tls.port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # never say hello
    try:
        t0 = time.monotonic()
        ok = dcmtk(ECHOSCU, port, *client_tls(pki))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # Behind one stalled handshake it would wait for its timeout (acse_timeout_s, 30 s);
        # below that, whatever the load, it did not.
        assert time.monotonic() - t0 < 25, "a handshake waited behind the stalled connections"
    finally:
        for s in stalled:
            s.close()


def test_tls_uses_tls_1_2_or_newer_only(tmp_path, start_node, pki):
    node = tls_node(tmp_path, start_node, pki)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"].pair.cert))
    ctx.load_cert_chain(str(pki["modality"].cert), str(pki["modality"].key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", node.settings.node.tls.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    ctx12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx12.load_verify_locations(str(pki["ca"].pair.cert))
    ctx12.load_cert_chain(str(pki["modality"].cert), str(pki["modality"].key))
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", node.settings.node.tls.port), timeout=5) as raw:
        with ctx12.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert "GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0]


# -- forwarding ------------------------------------------------------------------------------
def tls_orthanc(tmp_path: Path, pki, name: str = "orthanc-tls") -> Orthanc:
    return Orthanc(
        tmp_path / name,
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki["archive"].cert),
            "DicomTlsPrivateKey": str(pki["archive"].key),
            "DicomTlsTrustedCertificates": str(pki["ca"].pair.cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )


def delivery_states(node) -> dict[str, int]:
    with node.sessions() as s:
        rows = s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    return {st.value: n for st, n in rows}


@needs_orthanc
def test_forwarding_to_orthanc_over_dicom_tls_verifies_the_archive(tmp_path, start_node, pki):
    orthanc = tls_orthanc(tmp_path, pki)
    try:
        good = {"name": "tls", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "timeout_s": 5.0,
                "tls": {"ca_certificates": str(pki["ca"].pair.cert), "certificate": str(pki["node"].cert), "private_key": str(pki["node"].key)}}
        distrust = {"name": "distrust", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "timeout_s": 5.0,
                    "tls": {"ca_certificates": str(pki["rogue"].pair.cert), "certificate": str(pki["node"].cert), "private_key": str(pki["node"].key)}}
        plain = {"name": "plain", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "timeout_s": 5.0}
        raw = node_config(tmp_path, [good, distrust, plain], max_attempts=50)
        node = start_node(raw)
        files = make_study(tmp_path / "in", 4)
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(node.settings.node.port), *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: len(orthanc.instances()) == 4, timeout=60, what="4 instances at Orthanc over TLS")

        def waiting() -> dict:
            with node.sessions() as s:
                return {d.destination: d.reason for d in s.scalars(select(Delivery).where(Delivery.state == "RETRY_WAIT"))}

        reasons = wait_until(lambda: (w := waiting()).keys() == {"distrust", "plain"} and w, timeout=60, what="the untrusted and plain destinations to wait")
        assert "TLS" in reasons["distrust"]

        def sent() -> int:  # Orthanc may hold the last object a moment before its delivery is marked
            with node.sessions() as s:
                return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.destination == "tls", Delivery.state == "SENT"))

        wait_until(lambda: sent() == 4, timeout=30, what="4 deliveries SENT over TLS")
        assert len(orthanc.instances()) == 4, "nothing reached Orthanc without TLS or without verifying it"
    finally:
        orthanc.stop()


# -- DICOMweb over HTTPS -----------------------------------------------------------------------
class TlsFront:
    """HTTPS in front of a local HTTP port (Orthanc 1.10's own HTTPS server crashes on
    its first connection on this platform): TLS ends here, bytes go on unchanged."""

    def __init__(self, backend_port: int, cert: Path, key: Path) -> None:
        self.backend_port = backend_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            front = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        back = socket.create_connection(("127.0.0.1", self.backend_port))

        def pump(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(back, front), daemon=True)
        t.start()
        pump(front, back)
        t.join(10)
        front.close()
        back.close()

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()


@needs_orthanc
@needs_dicomweb
def test_dicomweb_over_https_with_basic_auth_from_a_file(tmp_path, start_node, pki, caplog):
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Pa55word-for-tests"
    orthanc = Orthanc(tmp_path / "orthanc-web", dicomweb=True, extra={"AuthenticationEnabled": True, "RegisteredUsers": {"casemask": password}}, http_auth=("casemask", password))
    front = TlsFront(orthanc.http_port, pki["archive"].cert, pki["archive"].key)
    try:
        secret = tmp_path / "stow.password"
        secret.write_text(password + "\n")
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-it\n")
        url = f"https://127.0.0.1:{front.port}/dicom-web"
        tls = {"ca_certificates": str(pki["ca"].pair.cert)}
        dests = [
            {"name": "web", "kind": "dicomweb", "url": url, "tls": tls, "auth": {"kind": "basic", "username": "casemask", "secret_file": str(secret)}},
            {"name": "badpass", "kind": "dicomweb", "url": url, "tls": tls, "auth": {"kind": "basic", "username": "casemask", "secret_file": str(wrong)}},
        ]
        node = start_node(node_config(tmp_path, dests))
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(node.settings.node.port), *map(str, make_study(tmp_path / "in", 2))], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: len(orthanc.instances()) == 2, timeout=60, what="2 instances stored through STOW-RS over HTTPS")
        wait_until(lambda: delivery_states(node) == {"SENT": 2, "FAILED": 2}, timeout=30, what="2 SENT, 2 FAILED (401)")
        with node.sessions() as s:
            assert {d.reason for d in s.scalars(select(Delivery).where(Delivery.state == "FAILED"))} == {"STOW-RS answered HTTP 401: credentials refused: check auth"}
        assert password not in caplog.text
    finally:
        front.stop()
        orthanc.stop()


def _sop_uids(body: bytes, content_type: str) -> list[str]:
    """The SOP Instance UIDs of the DICOM parts of a multipart/related request."""
    import io
    import re

    from pydicom import dcmread

    m = re.search(r'boundary="?([^";]+)"?', content_type)
    uids = []
    for part in body.split(b"--" + m.group(1).encode()) if m else []:
        head, sep, payload = part.partition(b"\r\n\r\n")
        if sep and b"application/dicom" in head:
            uids.append(str(dcmread(io.BytesIO(payload.removesuffix(b"\r\n"))).SOPInstanceUID))
    return uids


class _StowServer(http.server.BaseHTTPRequestHandler):
    """A STOW-RS endpoint that wants one bearer token (records what it saw)."""

    token = ""
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        data = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0)) if self.headers.get("Content-Length") else b""
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        ok = auth == f"Bearer {self.token}"
        # A Store Instances Response (PS3.18 10.5.3) naming the objects of the request.
        stored = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in _sop_uids(data, self.headers.get("Content-Type", ""))]
        body = json.dumps({"00081199": {"vr": "SQ", "Value": stored}}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a) -> None:
        pass


def test_dicomweb_bearer_token_from_the_environment_over_verified_https(tmp_path, start_node, pki, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    token = "tok-" + "x7" * 20
    monkeypatch.setenv("CASEMASK_TEST_STOW_TOKEN", token)
    _StowServer.token, _StowServer.seen = token, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StowServer)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki["archive"].cert), str(pki["archive"].key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/dicom-web"
        dests = [
            {"name": "bearer", "kind": "dicomweb", "url": url, "tls": {"ca_certificates": str(pki["ca"].pair.cert)}, "auth": {"kind": "bearer", "secret_env": "CASEMASK_TEST_STOW_TOKEN"}},
            {"name": "unverified", "kind": "dicomweb", "url": url, "tls": {"ca_certificates": str(pki["rogue"].pair.cert)}, "auth": {"kind": "bearer", "secret_env": "CASEMASK_TEST_STOW_TOKEN"}},
        ]
        node = start_node(node_config(tmp_path, dests, max_attempts=50))
        r = subprocess.run([STORESCU, "-aec", "CASEMASK", "127.0.0.1", str(node.settings.node.port), *map(str, make_study(tmp_path / "in", 2))], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

        def states():
            with node.sessions() as s:
                return {(d.destination, d.state.value) for d in s.scalars(select(Delivery))}

        wait_until(lambda: states() == {("bearer", "SENT"), ("unverified", "RETRY_WAIT")}, timeout=30, what="bearer SENT, unverified waiting")
        assert _StowServer.seen and set(_StowServer.seen) == {f"Bearer {token}"}, "the token is sent, and only to the verified server"
        assert token not in caplog.text
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_source_bound_to_a_client_certificate_is_admitted_only_with_it(tmp_path, start_node, pki):
    """[[sources]] certificate_cn binds an AE title to a client certificate: the CA's
    other certificates, the plain port and accept_unknown_sources cannot claim it; an
    unbound source is unchanged; a binding without a verifying TLS listener is a
    configuration problem."""
    from node.config import ConfigError, parse

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600)
    raw["sources"] = [{"ae_title": "MODALITY1", "certificate_cn": "modality-1"}, {"ae_title": "MODALITY2", "certificate_cn": "modality-2"}, {"ae_title": "ECHOSCU"}]
    with pytest.raises(ConfigError, match="certificate_cn needs \\[node.tls\\] with ca_certificates"):
        parse(raw, tmp_path)
    raw["node"]["tls"] = {"port": free_port(), "certificate": str(pki["node"].cert), "private_key": str(pki["node"].key),
                          "ca_certificates": str(pki["ca"].pair.cert), "require_client_certificate": True}
    node = start_node(raw, schedule=False)
    tls_port, plain_port = node.settings.node.tls.port, node.settings.node.port
    assert dcmtk(ECHOSCU, tls_port, *client_tls(pki), aet="MODALITY1").returncode == 0  # its own certificate (CN modality-1)
    claimed = dcmtk(ECHOSCU, tls_port, *client_tls(pki), aet="MODALITY2")  # the same CA, another source's AE title
    assert claimed.returncode != 0 and "Rejected" in claimed.stdout + claimed.stderr, claimed.stdout + claimed.stderr
    assert dcmtk(ECHOSCU, plain_port, aet="MODALITY1").returncode != 0  # a bound AE title on the plain port
    assert dcmtk(ECHOSCU, plain_port, aet="ECHOSCU").returncode == 0  # an unbound source as before
    # accept_unknown_sources admits strangers, never a bound AE title without its certificate.
    from node.admission import AccessPolicy

    raw["node"]["accept_unknown_sources"] = True
    policy = AccessPolicy(parse(raw, tmp_path))
    assert policy.check("STRANGER", "CASEMASK", "127.0.0.1") is None
    assert policy.check("MODALITY1", "CASEMASK", "127.0.0.1", "modality-1") is None
    refusal = policy.check("MODALITY1", "CASEMASK", "127.0.0.1", "modality-2")
    assert refusal is not None and "certificate_cn" in refusal[1]
    assert policy.check("MODALITY1", "CASEMASK", "127.0.0.1") is not None

"""A hostile DICOM peer, fourth pass (docs/security.md, "Fourth attack"): what a sender
can make of C-STOREs without a data set, of services the node does not offer, of TLS
certificates that should not pass, and of the titles it chooses."""

from __future__ import annotations

import datetime as dt
import sqlite3
import struct

import pytest
from pydicom import Dataset

from tests.conftest import node_config
from tests.rawdicom import (CT_IMAGE_STORAGE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, RELEASE_RQ, VERIFICATION, Raw, associate_rq, c_store_pdus,
                            encode, p_data, store_status)
from tests.test_attack import _ct
from tests.test_tls import pki  # noqa: F401  (fixture: the TLS tests' CA and certificates)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _folder_node(tmp_path, start_node, **kw):
    return start_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600, **kw), schedule=False)


def _rows(node) -> int:
    with sqlite3.connect(node.settings.node.data_dir / "casemask.db") as db:
        return db.execute("select count(*) from instances").fetchone()[0]


def _command(fields: dict[str, object]) -> bytes:
    cmd = Dataset()
    for k, v in fields.items():
        setattr(cmd, k, v)
    body = encode(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _exchange(port: int, contexts, pdus: list[bytes], calling: str = "STORESCU") -> tuple[bytes | None, list[tuple[int, bytes]]]:
    """Associate, send ``pdus``, read what comes back (up to a release reply or close):
    (the A-ASSOCIATE answer's body or None, the PDUs after it)."""
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling=calling, contexts=contexts))
        first = r.read_pdu()
        if first is None or first[0] != 0x02:
            return None, [first] if first else []
        for pdu in pdus:
            r.send(pdu)
        out = []
        got = r.read_pdu()
        if got is not None:
            out.append(got)
        r.send(RELEASE_RQ)
        while (got := r.read_pdu()) is not None:
            out.append(got)
            if got[0] in (0x06, 0x07):
                break
        return first[1], out


def _accepted(ac_body: bytes) -> dict[int, int]:
    """Presentation context ID -> result (0 acceptance) of an A-ASSOCIATE-AC body."""
    pos, out = 68, {}
    while pos + 4 <= len(ac_body):
        kind, _, length = struct.unpack(">BBH", ac_body[pos : pos + 4])
        if kind == 0x21:
            out[ac_body[pos + 4]] = ac_body[pos + 6]
        pos += 4 + length
    return out


def test_a_c_store_without_a_data_set_is_answered_cannot_understand(tmp_path, start_node):
    """A C-STORE-RQ whose Command Data Set Type says "no data set" (0x0101): nothing
    stored, and not 0xA700 (out of resources: the sender retries a request that can never
    succeed) but a Failure in 0xC000-0xCFFF, "cannot understand" (PS3.7 C.4.2.1.4, 9.1.1.1)."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct()
    cmd = _command({"AffectedSOPClassUID": CT_IMAGE_STORAGE, "CommandField": 0x0001, "MessageID": 1, "Priority": 0,
                    "CommandDataSetType": 0x0101, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID)})
    _ac, out = _exchange(node.settings.node.port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])], [p_data([(1, 0x03, cmd)])])
    statuses = [store_status(body) for kind, body in out if kind == 0x04]
    assert statuses and 0xC000 <= statuses[0] <= 0xCFFF, [hex(s) for s in statuses if s is not None]
    assert _rows(node) == 0


def test_a_data_set_of_another_sop_class_than_its_context_is_refused_not_acknowledged(tmp_path, start_node):
    """The command and its data set say MR while the presentation context was accepted
    for CT: 0x0122 (PS3.7 9.3.1), never Success, nothing stored; and a CT command
    carrying an MR data set on the CT context: 0xA900. The association survives both
    and the next, correct object is stored."""
    node = _folder_node(tmp_path, start_node)
    mr = _ct()
    mr.SOPClassUID = MR_IMAGE_STORAGE
    good = _ct()

    def store(ds, command_class: str, message_id: int) -> list[bytes]:
        cmd = _command({"AffectedSOPClassUID": command_class, "CommandField": 0x0001, "MessageID": message_id, "Priority": 0,
                        "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID)})
        return c_store_pdus(cmd, encode(ds, implicit=False))

    port = node.settings.node.port
    statuses = []
    with Raw(port, timeout=10) as r:
        r.send(associate_rq(calling="STORESCU", contexts=[(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])]))
        assert r.read_pdu()[0] == 0x02
        for ds, cls, mid in ((mr, MR_IMAGE_STORAGE, 1), (mr, CT_IMAGE_STORAGE, 2), (good, CT_IMAGE_STORAGE, 3)):
            for pdu in store(ds, cls, mid):
                r.send(pdu)
            got = r.read_pdu()
            statuses.append(store_status(got[1]) if got and got[0] == 0x04 else None)
        r.send(RELEASE_RQ)
        r.read_pdu()
    assert statuses == [0x0122, 0xA900, 0x0000], [hex(s) if s is not None else None for s in statuses]
    assert _rows(node) == 1


def test_query_retrieve_services_are_not_offered(tmp_path, start_node):
    """The node stores; it must answer no C-FIND, C-MOVE or C-GET (a query would list
    what it holds, a retrieve send originals away). Contexts for those models are
    refused within the association (result 3, abstract syntax not supported); a C-FIND
    sent anyway on the Verification context gets no match and nothing leaves."""
    node = _folder_node(tmp_path, start_node)
    ds = _ct(pn="SYNTHETIC^FINDME", pid="SYNTH-FIND-1")
    from tests.test_attack import _raw_store

    assert _raw_store(node.settings.node.port, ds) == 0x0000
    contexts = [(1, STUDY_ROOT_FIND, [IMPLICIT_VR_LE]), (3, STUDY_ROOT_MOVE, [IMPLICIT_VR_LE]), (5, STUDY_ROOT_GET, [IMPLICIT_VR_LE]),
                (7, VERIFICATION, [IMPLICIT_VR_LE])]
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.PatientName, identifier.PatientID, identifier.StudyInstanceUID = "STUDY", "*", "", ""
    find = _command({"AffectedSOPClassUID": STUDY_ROOT_FIND, "CommandField": 0x0020, "MessageID": 1, "Priority": 0, "CommandDataSetType": 0x0000})
    ac, out = _exchange(node.settings.node.port, contexts, [p_data([(7, 0x03, find)]), p_data([(7, 0x02, encode(identifier))])])
    assert ac is not None
    assert _accepted(ac) == {1: 3, 3: 3, 5: 3, 7: 0}
    answers = b"".join(body for kind, body in out if kind == 0x04)
    assert b"FINDME" not in answers and b"SYNTH-FIND-1" not in answers and str(ds.StudyInstanceUID).encode() not in answers


def _issue(ca, folder, cn: str, not_before: dt.datetime, not_after: dt.datetime, usages):
    """A client certificate from the test CA with the given validity and extended key usages."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.pki import _name, _write

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return _write(folder, cn, cert, key)


def test_tls_client_certificates_out_of_date_or_not_for_clients_are_refused(tmp_path, start_node, pki):
    """A client certificate from the trusted CA that has expired, is not yet valid, or
    is issued for servers only (extended key usage serverAuth) must not get an
    association on the TLS port; the valid one does."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from tests.test_tls import ECHOSCU, client_tls, dcmtk, tls_node

    node = tls_node(tmp_path, start_node, pki)
    port = node.settings.node.tls.port
    now = dt.datetime.now(dt.UTC)
    ca, folder = pki["ca"], tmp_path / "pki"
    pki["expired"] = _issue(ca, folder, "expired", now - dt.timedelta(days=10), now - dt.timedelta(days=1), [ExtendedKeyUsageOID.CLIENT_AUTH])
    pki["future"] = _issue(ca, folder, "future", now + dt.timedelta(days=1), now + dt.timedelta(days=10), [ExtendedKeyUsageOID.CLIENT_AUTH])
    pki["server-only"] = _issue(ca, folder, "server-only", now - dt.timedelta(days=1), now + dt.timedelta(days=1), [ExtendedKeyUsageOID.SERVER_AUTH])
    for who in ("expired", "future", "server-only"):
        r = dcmtk(ECHOSCU, port, *client_tls(pki, who))
        assert r.returncode != 0, f"{who}: {r.stdout} {r.stderr}"
    ok = dcmtk(ECHOSCU, port, *client_tls(pki, "modality"))
    assert ok.returncode == 0, ok.stderr

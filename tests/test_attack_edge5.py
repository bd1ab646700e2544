"""A hostile DICOM sender, eighth pass (docs/security.md, "Eighth attack"): the fragment
checks of one P-DATA-TF that carries more than one message part."""

from __future__ import annotations

import time

from tests.rawdicom import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, encode, p_data, store_status
from tests.test_attack import _ct
from tests.test_attack_edge4 import _associated, _command, _folder_node, _incoming, _raw_store_ok, _rows, _statuses, _store_fields

MR = "1.2.840.10008.5.1.4.1.1.4"


def test_a_second_command_in_the_p_data_of_the_first_is_refused(tmp_path, start_node):
    """The second-command check of the seventh pass, with both commands in one P-DATA-TF
    (two PDVs, each a command's last fragment): the check stopped reading a P-DATA at a
    command's last fragment ("what follows is pynetdicom's to judge"), and pynetdicom
    joined the second command to the first, opened a second incoming file for it and
    left the first one behind. The association is aborted now, as with the commands in
    two P-DATA: nothing answered Success, nothing stored, no incoming file left."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct(pn="SYNTHETIC^OTHER")
    cmd_b = _store_fields(b, 2)
    cmd_b["AffectedSOPClassUID"] = MR
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, MR, [EXPLICIT_VR_LE])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x03, _command(cmd_b))]))
        r.send(p_data([(1, 0x02, encode(a, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000, "answered Success"
    assert got is None or got[0] == 0x07, f"not aborted: PDU type {got[0]:#x}, status {store_status(got[1])}"
    time.sleep(0.5)  # the association's close deletes its partial data set
    assert _rows(node) == 0
    assert _incoming(node) == []
    assert _raw_store_ok(port)


def test_a_data_set_on_another_context_in_the_p_data_of_its_command_is_refused(tmp_path, start_node):
    """The other-context check of the seventh pass, with the command and its data set in
    one P-DATA-TF: the data set (explicit VR) on context 3 (implicit VR) after its
    command on context 1 was not looked at, and the node answered Success. It is aborted
    now, as with the data set in a P-DATA of its own."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, ["1.2.840.10008.1.2"])]) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1))), (3, 0x02, encode(ds, implicit=False))]))
        got = r.read_pdu()
    assert got is None or got[0] != 0x04 or store_status(got[1]) != 0x0000, "answered Success"
    assert _rows(node) == 0
    time.sleep(0.5)
    assert _incoming(node) == []
    assert _statuses(port, [(_command(_store_fields(ds, 1)), encode(ds, implicit=False))]) == [0x0000]


def test_a_command_and_its_data_set_in_one_p_data_are_stored(tmp_path, start_node):
    """A sender may put a C-STORE-RQ's command and its whole data set in one P-DATA-TF
    (PS3.8 9.3.5: one or more PDVs): stored, answered Success."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    ds = _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(ds, 1))), (1, 0x00, encode(ds, implicit=False)[:100]), (1, 0x02, encode(ds, implicit=False)[100:])]))
        got = r.read_pdu()
    assert got is not None and got[0] == 0x04 and store_status(got[1]) == 0x0000
    assert _rows(node) == 1


def test_an_empty_or_padded_certificate_cn_is_a_configuration_problem(tmp_path):
    """``certificate_cn = ""`` was read as no binding at all (``s.certificate_cn or
    None``): the operator who wrote it meant to bind the AE title, and it stayed open to
    any sender on the plain port (and to anyone with accept_unknown_sources). A CN with
    spaces around it matched no certificate. Both are refused when the configuration is
    read."""
    import pytest

    from node.config import ConfigError, parse
    from tests.conftest import node_config

    for cn in ("", " modality-1", "modality-1 "):
        raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
        raw["sources"] = [{"ae_title": "MODALITY1", "certificate_cn": cn}]
        with pytest.raises(ConfigError, match="certificate_cn"):
            parse(raw, "test", base_dir=tmp_path)


def _client_certificate(ca, stem: str, names: list[tuple[str, str]]):
    """A client certificate ``ca`` signs whose subject is ``names`` ((kind, value):
    "CN" or "O"), each its own RDN, in that order."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from tests.pki import _write

    oid = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(oid[k], v) for k, v in names]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return _write(ca.folder, stem, cert, key)


def test_a_bound_ae_title_is_not_admitted_with_a_look_alike_certificate(tmp_path, start_node):
    """MODALITY1 bound to CN ``modality-1`` ([node.tls] verifying client certificates but
    not requiring one, accept_unknown_sources = true, so only the binding refuses): a
    certificate with two CNs (``modality-1`` and another, either order), one with the CN
    in another case, one with no CN but an O of ``modality-1``, none at all, and one
    with CN ``modality-1`` signed by a CA the node does not trust are refused; the
    CA's ``modality-1`` is admitted. A reload that removes the binding admits the
    others again; one that adds it back refuses them (in every receiver process)."""
    import subprocess

    from node.config import parse
    from tests.conftest import ECHOSCU, dcmtk_env, free_port, node_config
    from tests.pki import CA

    if ECHOSCU is None:
        import pytest

        pytest.skip("dcmtk is not installed")
    ca, rogue = CA(tmp_path / "pki"), CA(tmp_path / "rogue", name="rogue CA")
    server = ca.issue("casemask-node", server=True, client=True)
    good = ca.issue("modality-1", client=True)
    look_alikes = {
        "two CNs": _client_certificate(ca, "two", [("CN", "modality-1"), ("CN", "intruder")]),
        "two CNs, other order": _client_certificate(ca, "two-b", [("CN", "intruder"), ("CN", "modality-1")]),
        "other case": _client_certificate(ca, "case", [("CN", "MODALITY-1")]),
        "no CN": _client_certificate(ca, "nocn", [("O", "modality-1")]),
        "untrusted CA": rogue.issue("modality-1", client=True),
    }
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}], stable_after_s=3600)
    raw["node"]["accept_unknown_sources"] = True
    raw["node"]["tls"] = {"port": free_port(), "certificate": str(server.cert), "private_key": str(server.key),
                          "ca_certificates": str(ca.pair.cert), "require_client_certificate": False}
    raw["sources"] = [{"ae_title": "MODALITY1", "certificate_cn": "modality-1"}]
    node = start_node(raw, schedule=False)
    port = node.settings.node.tls.port

    def echo(pair=None) -> bool:
        tls = ["+tls", str(pair.key), str(pair.cert)] if pair else ["+tla"]
        tls += ["+cf", str(ca.pair.cert)]
        done = subprocess.run([ECHOSCU, "-aet", "MODALITY1", "-aec", "CASEMASK", *tls, "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        return done.returncode == 0

    assert echo(good)
    admitted = {what: echo(pair) for what, pair in look_alikes.items()} | {"no certificate": echo()}
    assert not any(admitted.values()), admitted
    unbound = dict(raw, sources=[{"ae_title": "MODALITY1"}])
    node.reload(parse(unbound, "test", base_dir=tmp_path))
    assert echo(look_alikes["other case"]) and echo()  # accept_unknown_sources: anyone
    node.reload(parse(raw, "test", base_dir=tmp_path))
    assert not echo(look_alikes["other case"]) and not echo()
    assert echo(good)


def test_a_deflated_data_set_holds_its_size_of_the_budget_while_it_is_walked(tmp_path, monkeypatch):
    """After inflating, the inflated bytes are copied once (the walk reads bytes) and the
    buffer they were inflated into is freed; the budget kept counting both until the walk
    ended, so one inflation of half the budget (the most one may take) held all of it:
    every other deflated sender was refused 0xA700 for as long as that walk ran. Now the
    walk holds what it reads, the object's size, and all of it is given back after."""
    import zlib

    import types

    from node import scp

    monkeypatch.setattr(scp, "_inflating", scp._Budget(scp.INFLATE_BUDGET))
    size = 4 * 1024 * 1024
    path = tmp_path / "deflated"
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    path.write_bytes(b"HEAD" + c.compress(b"\0" * size) + c.flush())
    incoming = types.SimpleNamespace(path=path, sync=lambda: None)  # what _inflate reads of an IncomingFile
    with scp._inflated(incoming, 4, size * 2) as data:
        assert len(data) == size
        assert scp._inflating.used == size, f"{scp._inflating.used / size:.2f} times the object held during the walk"
    assert scp._inflating.used == 0


def test_a_store_and_the_next_command_in_one_p_data_store_the_first(tmp_path, start_node):
    """A C-STORE-RQ's command, its whole data set and the next C-STORE-RQ's command in one
    P-DATA-TF: pynetdicom ends the first message at its data set's last fragment and
    reads no further PDV of that P-DATA. The fragment check follows it there (it does not
    take the next command for a second command of the first message): the first object
    is stored and answered Success."""
    node = _folder_node(tmp_path, start_node)
    port = node.settings.node.port
    a, b = _ct(), _ct()
    with _associated(port) as r:
        r.send(p_data([(1, 0x03, _command(_store_fields(a, 1))), (1, 0x02, encode(a, implicit=False)), (1, 0x03, _command(_store_fields(b, 2)))]))
        got = r.read_pdu()
    assert got is not None and got[0] == 0x04 and store_status(got[1]) == 0x0000
    assert _rows(node) == 1

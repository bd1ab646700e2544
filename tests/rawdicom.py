"""A DICOM Upper Layer client made of raw bytes (PS3.8 9.3), for sending a node what no
well-behaved library would: cut-off PDUs, absurd lengths, data sets that end early."""

from __future__ import annotations

import socket
import struct

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(called: str = "CASEMASK", calling: str = "MODALITY1", contexts: list[tuple[int, str, list[str]]] | None = None, max_pdu: int = 16384, declared_length: int | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU; ``declared_length`` overrides the PDU length field."""
    if contexts is None:
        contexts = [(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999")
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32 + items
    return struct.pack(">BBI", 0x01, 0, len(body) if declared_length is None else declared_length) + body


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, fragment) PDVs."""
    body = b"".join(struct.pack(">IBB", len(frag) + 2, cid, ctrl) + frag for cid, ctrl, frag in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBII", 0x05, 0, 4, 0)
ABORT = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)


def encode(ds: Dataset, implicit: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The encoded command set of a C-STORE-RQ (PS3.7 9.3.1.1), with its group length."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance
    body = encode(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_store_pdus(command: bytes, dataset: bytes, context_id: int = 1, fragment: int = 16000, last: bool = True) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ: the command, then the data set in fragments
    (the last one flagged last unless ``last=False``)."""
    out = [p_data([(context_id, 0x03, command)])]
    parts = [dataset[k : k + fragment] for k in range(0, len(dataset), fragment)] or [b""]
    for k, part in enumerate(parts):
        out.append(p_data([(context_id, 0x02 if (last and k == len(parts) - 1) else 0x00, part)]))
    return out


class Raw:
    """A TCP connection speaking raw PDUs."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> bool:
        """False when the peer has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self) -> tuple[int, bytes] | None:
        """(PDU type, body), or None when the connection closed or timed out first."""
        try:
            head = self._read(6)
            if head is None:
                return None
            kind, _, length = struct.unpack(">BBI", head)
            body = self._read(length)
            return None if body is None else (kind, body)
        except OSError:
            return None

    def _read(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def store_status(body: bytes) -> int | None:
    """The Status of a C-STORE-RSP in a P-DATA-TF body (None if absent)."""
    pos = 0
    while pos + 6 <= len(body):
        length = struct.unpack(">I", body[pos : pos + 4])[0]
        frag = body[pos + 6 : pos + 4 + length]
        k = 0
        while k + 8 <= len(frag):
            group, elem, vlen = struct.unpack("<HHI", frag[k : k + 8])
            if (group, elem) == (0x0000, 0x0900):
                return struct.unpack("<H", frag[k + 8 : k + 10])[0]
            k += 8 + vlen
        pos += 4 + length
    return None

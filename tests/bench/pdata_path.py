"""CPU of one P-DATA-TF's way from the bytes read to ``receive_primitive``, pynetdicom's
path against node.pdatafast's, without sockets or other threads.

    python tests/bench/pdata_path.py [--repeat 5000] [--rounds 5]

An acceptor ``Association`` (never connected) in state Sta6 whose DIMSE layer takes
the primitive and drops it. pynetdicom's path: ``_decode_pdu`` (PDU objects), Evt10 and
the PDU queued, the event taken out, ``do_action`` (DT-2: ``to_primitive``, then
``receive_primitive``); the fast path: ``pdv_list``, a ``P_DATA``, ``deliver``. Both for
the bench's C-STORE: a command PDU (one PDV of 160 bytes) and a data PDU (one PDV of
38 KB). Prints thread CPU microseconds per PDU for each, per round, alternately (the
read itself, the socket's ``recv``, is the same in both and not counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.pdu_primitives import P_DATA  # noqa: E402

from node import pdatafast  # noqa: E402
from tests.rawdicom import CT_IMAGE_STORAGE, c_store_command, p_data  # noqa: E402


def _association() -> Association:
    _config.LOG_HANDLER_LEVEL = "none"  # as the node runs (no handler bound to EVT_PDU_RECV)
    assoc = Association(AE(), "acceptor")
    assoc.dul.state_machine.current_state = "Sta6"
    assoc.dimse.receive_primitive = lambda primitive: None  # as node.admission's guard: an instance attribute
    return assoc


def pynetdicom_path(dul, pdu: bytearray) -> None:
    received, event = dul._decode_pdu(pdu)
    dul.event_queue.put(event)
    dul._recv_pdu.put(received)
    dul.state_machine.do_action(dul.event_queue.get(block=False))


def fast_path(dul, pdu: bytearray) -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(pdatafast.pdv_list(pdu))
    pdatafast.deliver(dul, primitive)


def _cpu_us(fn, dul, pdu: bytearray, repeat: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(repeat):
        fn(dul, pdu)
    return (time.thread_time_ns() - t0) / repeat / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    assert pdatafast.install(), "pynetdicom is not the version node.pdatafast was written for"
    dul = _association().dul
    command = bytearray(p_data([(1, 0x03, c_store_command(CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.9.9999.1.2.3.4.5.6.7.8.9.10.11.12.13.14", 1))]))
    data = bytearray(p_data([(1, 0x02, bytes(38 * 1024))]))
    print(f"load average {os.getloadavg()[0]:.1f}; us of thread CPU per PDU (pynetdicom / fast path)")
    for r in range(args.rounds):
        row = []
        for name, pdu in (("command", command), ("data 38 KB", data)):
            slow = _cpu_us(pynetdicom_path, dul, pdu, args.repeat)
            fast = _cpu_us(fast_path, dul, pdu, args.repeat)
            row.append(f"{name}: {slow:6.1f} / {fast:5.1f}")
        print(f"round {r + 1}: " + "   ".join(row))
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

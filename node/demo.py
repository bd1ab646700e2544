"""``casemask demo``: send synthetic chest studies to a running node and show the result.

Writes a few DX studies of synthetic patients (invented names, IDs, birth dates,
institutions: no real person), sends them to the node named by the config, waits for
the node to de-identify and deliver them, and prints where they landed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def cmd_demo(args) -> int:
    from pydicom import dcmread
    from sqlalchemy import select

    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies
    from node import queue
    from node.config import Destination, load
    from node.db import Delivery, DeliveryState, Output, make_engine, make_sessionmaker
    from node.scu import DicomSender, Outcome, Work

    settings = load(args.config)
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="casemask-demo-"))
    files = write_dicom_studies(SyntheticPatients(args.patients, args.visits, args.size, args.seed), folder)
    print(f"wrote {len(files)} synthetic chest studies to {folder}; e.g. patient {dcmread(files[0]).PatientName} ({dcmread(files[0]).PatientID}), synthetic")
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::") else settings.node.host
    dest = Destination(name="demo", kind="dicom", ae_title=settings.node.ae_title, host=host, port=settings.node.port)
    failures: list[str] = []

    def report(w: Work, o: Outcome) -> None:
        if o.kind != "sent":
            failures.append(f"{w.path.name}: {o.reason}")

    work = [Work(k, f, str(dcmread(f).SOPClassUID), str(dcmread(f).file_meta.TransferSyntaxUID)) for k, f in enumerate(files)]
    DicomSender(dest, args.calling_ae).send(work, report)
    if failures:
        print("could not send to the node:\n  " + "\n  ".join(failures[:5]), file=sys.stderr)
        print(f"is `casemask serve` running on {host}:{settings.node.port} with {args.calling_ae} in [[sources]]?", file=sys.stderr)
        return 1
    print(f"sent {len(files)} objects to {settings.node.ae_title}@{host}:{settings.node.port}; the node waits {settings.node.stable_after_s:.0f} s for each study to be complete")
    engine = make_engine(settings.node.resolved_database_url)
    sessions = make_sessionmaker(engine)
    deadline = time.monotonic() + settings.node.stable_after_s + args.timeout
    sop_uids = {str(dcmread(f).SOPInstanceUID) for f in files}
    while time.monotonic() < deadline:
        with sessions() as s:
            from node.db import Instance, InstanceState

            states = dict(s.execute(select(Instance.sop_instance_uid, Instance.state).where(Instance.sop_instance_uid.in_(sop_uids))).all())
            done = len(states) == len(sop_uids) and all(v in (InstanceState.PROCESSED, InstanceState.QUARANTINED) for v in states.values())
            pending = s.scalar(select(Delivery.id).join(Output).where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.RETRY_WAIT])).limit(1))
            if done and pending is None:
                break
        time.sleep(0.5)
    else:
        print("timed out waiting for the node; see `casemask status`", file=sys.stderr)
        return 1
    with sessions() as s:
        counts = queue.counts(s)
    q = sum(1 for v in states.values() if v == InstanceState.QUARANTINED)
    print(f"processed {len(states) - q}, quarantined {q}")
    for d in settings.destinations:
        where = str(d.path) if d.kind == "folder" else (f"{d.ae_title}@{d.host}:{d.port}" if d.kind == "dicom" else d.url)
        print(f"destination {d.name} ({d.kind}): {counts.get(f'destination:{d.name}', {})} -> {where}")
    return 0


def add_demo_parser(sub) -> None:
    sp = sub.add_parser("demo", help="send synthetic chest studies to a running node and show where results landed")
    sp.add_argument("--config", "-c", metavar="FILE", help="the running node's config (default: built-in)")
    sp.add_argument("--patients", type=int, default=3)
    sp.add_argument("--visits", type=int, default=2)
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--seed", type=int, default=2026)
    sp.add_argument("--out", metavar="DIR", help="where to write the synthetic studies (default: a temporary folder)")
    sp.add_argument("--calling-ae", default="CASEMASK")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait after the stability period")
    sp.set_defaults(func=cmd_demo)

"""``casemask demo``: synthetic chest studies through a node, and where the result landed.

Writes a few DX studies of synthetic patients (invented names, IDs, birth dates,
institutions: no real person), starts a node on the demonstration configuration
(``config/demo.toml``: its chest route anonymizes pixels with the built-in demonstration
model, allowed there on purpose, which the built-in configuration does not), sends the
studies to it, waits for it to de-identify and deliver them, prints where they landed and
what the gates said, and stops the node. ``--running`` sends to a node already running on
the given configuration instead.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def cmd_demo(args) -> int:
    from node.config import load
    from node.resources import config_file

    settings = load(args.config or config_file("demo.toml"))
    node = None
    if not args.running:
        from node.app import Node

        node = Node(settings)
        try:
            node.start()
        except OSError as exc:
            node.stop()
            print(f"cannot listen on {settings.node.host}:{settings.node.port} ({exc.strerror}); is a node already running there? then add --running", file=sys.stderr)
            return 1
    try:
        if args.out:
            return _run(args, settings, Path(args.out))
        with tempfile.TemporaryDirectory(prefix="casemask-demo-") as tmp:
            return _run(args, settings, Path(tmp))
    finally:
        if node is not None:
            node.stop()


def _run(args, settings, folder: Path) -> int:
    """Send the synthetic studies (written to ``folder``), wait for the node, report."""
    from pydicom import dcmread
    from sqlalchemy import select

    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies
    from node import queue
    from node.config import Destination
    from node.db import Delivery, DeliveryState, Instance, InstanceState, Job, Output, data_path, make_engine, make_sessionmaker
    from node.scu import DicomSender, Outcome, Work

    files = write_dicom_studies(SyntheticPatients(args.patients, args.visits, args.size, args.seed), folder)
    kept = "" if args.out else " (removed when the demo ends; --out DIR keeps them)"
    print(f"wrote {len(files)} synthetic chest studies to {folder}{kept}; e.g. patient {dcmread(files[0]).PatientName} ({dcmread(files[0]).PatientID}), synthetic")
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
        print(f"does the node on {host}:{settings.node.port} have {args.calling_ae} in [[sources]]?", file=sys.stderr)
        return 1
    print(f"sent {len(files)} objects to {settings.node.ae_title}@{host}:{settings.node.port}; the node waits {settings.node.stable_after_s:.0f} s for each study to be complete")
    engine = make_engine(settings.node.resolved_database_url)
    sessions = make_sessionmaker(engine)
    deadline = time.monotonic() + settings.node.stable_after_s + args.timeout
    sop_uids = {str(dcmread(f).SOPInstanceUID) for f in files}
    while time.monotonic() < deadline:
        with sessions() as s:
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
        records = [json.loads(r) for r in s.scalars(select(Job.record).join(Instance).where(Instance.sop_instance_uid.in_(sop_uids))) if r]
        example = s.scalar(select(Output.path).join(Job).join(Instance).where(Instance.sop_instance_uid.in_(sop_uids)).limit(1))
    q = sum(1 for v in states.values() if v == InstanceState.QUARANTINED)
    print(f"processed {len(states) - q}, quarantined {q}")
    gated = [r["gates"] for r in records if "gates" in r]
    if gated:
        failed = [g for r in gated for g in r["failed"]]
        print(f"gates: {len(gated)} images judged, {sum(r['passed'] for r in gated)} passed" + (f"; failed: {', '.join(sorted(set(failed)))}" if failed else ""))
    if example:
        example = data_path(settings.node.data_dir, example)
    if example and example.exists():
        print(f"each output says what it is, e.g. DerivationDescription: {dcmread(example, stop_before_pixels=True).get('DerivationDescription', '(none)')}")
    for d in settings.destinations:
        where = str(d.path) if d.kind == "folder" else (f"{d.ae_title}@{d.host}:{d.port}" if d.kind == "dicom" else d.url)
        states = counts.get(f"destination:{d.name}", {})
        print(f"destination {d.name} ({d.kind}): {'  '.join(f'{k}={v}' for k, v in sorted(states.items())) or 'nothing sent'} -> {where}")
    return 0


def add_demo_parser(sub) -> None:
    sp = sub.add_parser("demo", help="synthetic chest studies through a node on the demonstration config; shows where results landed")
    sp.add_argument("--config", "-c", metavar="FILE", help="the node's config (default: config/demo.toml, whose chest route anonymizes pixels)")
    sp.add_argument("--running", action="store_true", help="send to a node already running on that config instead of starting one")
    sp.add_argument("--patients", type=int, default=3, help="synthetic patients (default: 3)")
    sp.add_argument("--visits", type=int, default=2, help="studies per patient (default: 2)")
    sp.add_argument("--size", type=int, default=256, metavar="PIXELS", help="rows and columns of each synthetic radiograph (default: 256)")
    sp.add_argument("--seed", type=int, default=2026, help="random seed of the synthetic patients (default: 2026)")
    sp.add_argument("--out", metavar="DIR", help="keep the synthetic studies in DIR (default: a temporary folder, removed at the end)")
    sp.add_argument("--calling-aet", "-aet", "--calling-ae", dest="calling_ae", default="CASEMASK", metavar="AE", help="the AE title to send as (default: CASEMASK); must be in the config's [[sources]]")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait after the stability period")
    sp.set_defaults(func=cmd_demo)

"""The ``casemask`` command.

    casemask serve [--config FILE]
    casemask echo AE@HOST:PORT
    casemask send PATH... --to AE@HOST:PORT
    casemask status [--json]
    casemask routes explain FILE...
    casemask retry [--destination NAME] [--quarantined]
    casemask config check [FILE]
    casemask deid PATH... --out DIR [--route NAME] [--diff]
    casemask export-mapping --out DIR
    casemask engine synth|train|evaluate|export|build ...
    casemask demo

Exit status: 0 success, 1 failure of the operation, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("casemask")


class UsageError(Exception):
    pass


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # 'skipped: already running' is normal


def _settings(args):
    from node.config import load

    return load(getattr(args, "config", None))


def parse_peer(text: str) -> tuple[str, str, int]:
    """'AE@host:port' -> (ae, host, port)."""
    m = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:]+):(\d{1,5})", text)
    if not m:
        raise UsageError(f"{text!r}: write the peer as AE_TITLE@HOST:PORT, e.g. ARCHIVE@127.0.0.1:4242")
    host = m.group(2).strip("[]")
    return m.group(1), host, int(m.group(3))


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return out


# -- commands ---------------------------------------------------------------------------
def cmd_serve(args) -> int:
    settings = _settings(args)
    from node.app import Node

    node = Node(settings)
    print(f"casemask {settings.node.ae_title} listening on {settings.node.host}:{settings.node.port}; data in {settings.node.data_dir}", file=sys.stderr)
    node.serve_forever()
    return 0


def cmd_echo(args) -> int:
    from node.scu import echo

    ae, host, port = parse_peer(args.peer)
    status = echo(ae, host, port, calling_ae=args.calling_ae, timeout=args.timeout)
    if status is None:
        print(f"C-ECHO {args.peer}: no association (refused, rejected or timed out)", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.config import Destination
    from node.scu import DicomSender, Outcome, Work

    ae, host, port = parse_peer(args.to)
    work = []
    for k, f in enumerate(_files(args.paths)):
        try:
            ds = dcmread(f, stop_before_pixels=True)
            work.append(Work(k, f, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            print(f"skipped {f}: not a DICOM file ({type(exc).__name__})", file=sys.stderr)
    if not work:
        print("nothing to send", file=sys.stderr)
        return 1
    dest = Destination(name="cli", kind="dicom", ae_title=ae, host=host, port=port, timeout_s=args.timeout)
    results: dict[str, int] = {}
    failures = []

    def report(w: Work, o: Outcome) -> None:
        results[o.kind] = results.get(o.kind, 0) + 1
        if o.kind != "sent":
            failures.append(f"{w.path}: {o.reason}")

    DicomSender(dest, args.calling_ae).send(work, report)
    for line in failures[:20]:
        print(line, file=sys.stderr)
    print(f"sent {results.get('sent', 0)} of {len(work)} to {args.to}" + ("" if not failures else f"; {len(failures)} not sent"))
    return 0 if not failures else 1


def cmd_status(args) -> int:
    settings = _settings(args)
    from node import queue
    from node.db import make_engine, make_sessionmaker

    engine = make_engine(settings.node.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        counts = queue.counts(session)
    info = {"node": settings.node.ae_title, "data_dir": str(settings.node.data_dir), "counts": counts}
    models_file = settings.node.data_dir / "models.json"
    if models_file.exists():
        info["models"] = json.loads(models_file.read_text())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"node {settings.node.ae_title}  data {settings.node.data_dir}")
    for group, states in counts.items():
        line = "  ".join(f"{k}={v}" for k, v in sorted(states.items())) or "-"
        print(f"  {group:<24} {line}")
    for name, m in info.get("models", {}).items():
        print(f"  model {name}: backend {m.get('backend')} on {m.get('device')} ({m.get('why', '')})")
    return 0


def cmd_routes_explain(args) -> int:
    settings = _settings(args)
    from pydicom import dcmread

    from node import routing

    keys = routing.keys_used(settings.routes)
    status = 0
    for f in _files(args.files):
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            print(f"{f}: not readable as DICOM ({type(exc).__name__})")
            status = 1
            continue
        attrs = routing.attributes_of(ds, args.calling_ae, settings.node.ae_title, keys)
        verdicts = routing.match_routes(settings.routes, attrs)
        matched = [v.route for v in verdicts if v.matched]
        print(f"{f}: " + (f"routes {', '.join(matched)}" if matched else f"no route matches (unrouted = {settings.node.unrouted})"))
        for v in verdicts:
            print(f"  {'MATCH' if v.matched else 'no   '} {v.route}: " + "; ".join(v.reasons))
    return status


def cmd_retry(args) -> int:
    settings = _settings(args)
    from node import queue
    from node.db import make_engine, make_sessionmaker

    engine = make_engine(settings.node.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        n = queue.requeue_failed(session, args.destination)
        q = queue.requeue_quarantined(session) if args.quarantined else 0
        session.commit()
    print(f"re-queued {n} failed deliveries" + (f" and {q} quarantined jobs" if args.quarantined else ""))
    return 0


def cmd_config_check(args) -> int:
    from node.config import ConfigError, load

    try:
        s = load(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for w in s.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{s.source_file}: OK ({len(s.sources)} sources, {len(s.destinations)} destinations, {len(s.routes)} routes, {len(s.models)} models)")
    return 0


_DEID = None  # the worker process's Deidentifier (set by _deid_worker_init)


def _deid_worker_init(deid_settings, secret: bytes, pixels_cleaned: bool, record: bool) -> None:
    from node.deid import Deidentifier, Pseudonymizer

    global _DEID
    _DEID = Deidentifier(deid_settings, Pseudonymizer(secret), pixels_cleaned=pixels_cleaned, record_changes=record)


def _deid_one(job: tuple[str, str, bool]) -> tuple[str, str, str, list]:
    """De-identify one file: (status, source, message or target, diff lines)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.deid import QuarantineError, to_bytes

    src, out, diff = job
    try:
        ds = dcmread(src)
    except (InvalidDicomError, OSError) as exc:
        return "skipped", src, f"not a DICOM file ({type(exc).__name__})", []
    before = [(e.tag, e.keyword, e.VR) for e in ds.iterall()] if diff else []
    try:
        res = _DEID.apply(ds)
    except QuarantineError as exc:
        return "quarantined", src, str(exc), []
    target = Path(out) / f"{res.dataset.file_meta.MediaStorageSOPInstanceUID}.dcm"
    target.write_bytes(to_bytes(res.dataset))
    lines: list[str] = []
    if diff:
        changed = {p for p, _, _ in res.changes}
        lines = [f"  {act} {path} {kw}" for path, act, kw in res.changes]
        kept = sorted({kw or str(t) for t, kw, vr in before if f"({t.group:04X},{t.element:04X})" not in changed and vr != "SQ"})
        lines.append(f"  kept {len(kept)} attributes: " + ", ".join(kept))
    return "ok", src, str(target), lines


# What pydicom imports when present and `casemask deid` never uses: numpy, and the pixel
# codec plugins it probes at import time. Keeping them out takes a fresh `casemask deid`
# from about 0.25 s to 0.13 s of start-up, which is most of the time on a small folder.
_PIXEL_MODULES = ("numpy", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls", "pyjpegls", "gdcm")


def _import_headers_only() -> None:
    """Import pydicom without its pixel machinery, when nothing has imported it yet (in
    a process that already uses numpy or pydicom, nothing changes)."""
    if "pydicom" in sys.modules or "numpy" in sys.modules:
        return
    blocked = [m for m in _PIXEL_MODULES if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # 'import m' raises ImportError
    try:
        import pydicom  # noqa: F401
    finally:
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def cmd_deid(args) -> int:
    import os

    _import_headers_only()

    from node.config import DeidSettings, load
    from node.deid import load_or_create_secret

    if args.config or args.route:
        settings = load(args.config)
        if args.route:
            try:
                route = settings.route(args.route)
            except KeyError:
                raise UsageError(f"no route named {args.route!r} in {settings.source_file}") from None
        else:
            route = settings.routes[0] if settings.routes else None
        deid_settings = route.deid if route and route.deid else DeidSettings()
        pixels_cleaned = bool(route and route.pixels == "anonymize")
        secret_path = Path(args.secret) if args.secret else settings.node.resolved_secret_path
    else:
        deid_settings = DeidSettings(options=args.option or [])
        pixels_cleaned = False
        secret_path = Path(args.secret) if args.secret else Path("var/secret.key")
    secret = load_or_create_secret(secret_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in _files(args.paths)]
    jobs = [(f, str(out), args.diff) for f in files]
    n_jobs = args.jobs or os.cpu_count() or 1
    init = (deid_settings, secret, pixels_cleaned, args.diff)
    if n_jobs > 1 and len(files) >= 32:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_deid_worker_init, initargs=init) as pool:
            results = list(pool.map(_deid_one, jobs, chunksize=max(1, len(jobs) // (n_jobs * 8))))
    else:
        _deid_worker_init(*init)
        results = [_deid_one(j) for j in jobs]
    counts = {"ok": 0, "quarantined": 0, "skipped": 0}
    for status, src, msg, lines in results:
        counts[status] += 1
        if status == "ok":
            if args.diff:
                print(f"== {src} -> {msg}")
                print("\n".join(lines))
        else:
            print(f"{status} {src}: {msg}", file=sys.stderr)
    print(f"de-identified {counts['ok']}, quarantined {counts['quarantined']}, skipped {counts['skipped']}; output in {out}", file=sys.stderr)
    return 0 if counts["ok"] == len(files) else 1


def cmd_export_mapping(args) -> int:
    settings = _settings(args)
    import csv

    from sqlalchemy import select

    from node.db import Pseudonym, make_engine, make_sessionmaker

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.node.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        for kind, name in (("uid", "uids.csv"), ("patient", "patient_ids.csv")):
            rows = session.execute(select(Pseudonym.old, Pseudonym.new).where(Pseudonym.kind == kind).order_by(Pseudonym.id)).all()
            with (out / name).open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id_old", "id_new"])
                w.writerows(rows)
            print(f"{out / name}: {len(rows)} rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casemask", description="DICOM de-identification node.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c", metavar="FILE", help="TOML configuration (default: the built-in config/casemask.toml)")
        return sp

    sp = with_config(sub.add_parser("serve", help="receive, de-identify and forward until stopped"))
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    sp.add_argument("peer", metavar="AE@HOST:PORT")
    sp.add_argument("--calling-ae", default="CASEMASK")
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_echo)

    sp = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    sp.add_argument("--calling-ae", default="CASEMASK")
    sp.add_argument("--timeout", type=float, default=30.0)
    sp.set_defaults(func=cmd_send)

    sp = with_config(sub.add_parser("status", help="counts per state and per destination"))
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("routes", help="inspect routing")
    rsub = sp.add_subparsers(dest="routes_command", metavar="SUBCOMMAND", required=True)
    ex = with_config(rsub.add_parser("explain", help="which routes each file matches and why; sends nothing"))
    ex.add_argument("files", nargs="+", metavar="FILE")
    ex.add_argument("--calling-ae", default="", help="calling AE title to assume for calling_ae conditions")
    ex.set_defaults(func=cmd_routes_explain)

    sp = with_config(sub.add_parser("retry", help="re-queue dead-letter deliveries"))
    sp.add_argument("--destination", metavar="NAME", help="only this destination")
    sp.add_argument("--quarantined", action="store_true", help="also re-process quarantined objects")
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    ck = csub.add_parser("check", help="validate a configuration file")
    ck.add_argument("file", nargs="?", metavar="FILE", help="default: the built-in config")
    ck.set_defaults(func=cmd_config_check)

    sp = sub.add_parser("deid", help="de-identify files with a route's header profile")
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursed)")
    sp.add_argument("--out", required=True, metavar="DIR")
    sp.add_argument("--config", "-c", metavar="FILE")
    sp.add_argument("--route", metavar="NAME", help="use this route's deid settings (default: basic profile)")
    sp.add_argument("--option", action="append", metavar="OPTION", help="profile option, e.g. retain-longitudinal-modified-dates (repeatable)")
    sp.add_argument("--secret", metavar="FILE", help="pseudonym secret (default: the node's)")
    sp.add_argument("--diff", action="store_true", help="print every attribute changed, removed or kept")
    sp.add_argument("--jobs", "-j", type=int, default=0, metavar="N", help="worker processes (default: one per CPU core)")
    sp.set_defaults(func=cmd_deid)

    sp = with_config(sub.add_parser("export-mapping", help="write uids.csv and patient_ids.csv (id_old,id_new)"))
    sp.add_argument("--out", required=True, metavar="DIR")
    sp.set_defaults(func=cmd_export_mapping)

    try:
        from engine.cli import add_engine_parser

        add_engine_parser(sub)
    except ImportError:
        pass
    try:
        from node.demo import add_demo_parser

        add_demo_parser(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose if args.command != "serve" else max(1, args.verbose))
    from node.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"casemask: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``casemask`` command.

    casemask serve [--config FILE] [--role all|ingest|worker]
    casemask db upgrade|current
    casemask echo AE@HOST:PORT
    casemask send PATH... --to AE@HOST:PORT
    casemask status [--json]
    casemask routes explain FILE...
    casemask retry [--destination NAME] [--quarantined] [--held]
    casemask quarantine list [--json] | show JOB [--instance] | retry JOB... | discard JOB...
    casemask purge [--dry-run]
    casemask config check [FILE]
    casemask user add NAME --role viewer|operator|admin   (password on standard input)
    casemask token create --name NAME --role viewer|operator|admin
    casemask deid PATH... --out DIR [--route NAME] [--burned-in clean] [--diff]
    casemask deid --verify-only ORIGINAL DEIDENTIFIED
    casemask export-mapping --out DIR        (uids.csv, patients.csv; 0700 folder, 0600 files)
    casemask similar FILE [--k 5] [--contrast] [--json] [--png OUT.png]
    casemask index rebuild [--route NAME] | status
    casemask engine synth|train|evaluate|export|build ...
    casemask demo

Exit status: 0 success, 1 failure of the operation, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path

from node import logfmt

log = logging.getLogger("casemask")


class UsageError(Exception):
    pass


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logfmt.configure(level)  # control characters a peer sent are escaped: one record, one line
    if verbose < 2:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # 'skipped: already running' is normal
        logging.getLogger("alembic").setLevel(logging.WARNING)  # node.schema says what it upgraded
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # "store instances" per object: node.dispatch says what came of it
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start lines repeat node.http.server's; bind errors still show


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

    from node.pixels import describe_route, route_models

    for entry in route_models(settings):
        log.info("%s", describe_route(entry))
    node = Node(settings, role=args.role)
    doing = f"listening on {_listeners(settings.node)}" if node.ingests else "working (routing, processing, dispatch, retention)"
    node.serve_forever(started=lambda: print(f"casemask {settings.node.ae_title} ({args.role}) {doing}; data in {settings.node.data_dir}; pid {os.getpid()} (kill -HUP {os.getpid()} re-reads the configuration)", file=sys.stderr, flush=True))
    return 0


def _listeners(node) -> str:
    """The DICOM ports of the start line: ``127.0.0.1:11112`` and/or ``127.0.0.1:2762 (DICOM TLS)``
    (``[node] port = 0``: TLS only)."""
    ports = [f"{node.host}:{node.port}"] if node.port else []
    if node.tls is not None:
        ports.append(f"{node.host}:{node.tls.port} (DICOM TLS)")
    return " and ".join(ports)


def cmd_db(args) -> int:
    """``casemask db upgrade``: bring the database's schema to this version's (under the
    same rules as at start, node.schema). ``casemask db current``: its revision."""
    settings = _settings(args)
    from node import schema
    from node.db import make_engine
    from node.startup import owner_only_folder

    url = settings.node.resolved_database_url
    if args.db_command == "current" and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        # Opening it would make an empty file that later commands take for the node's.
        print(f"database: revision none (no file at {url.removeprefix('sqlite:///')}); this casemask: revision {schema.HEAD} "
              "(run `casemask db upgrade`, or run this in the folder the node is started in)")
        return 1
    if not settings.node.database_url:  # SQLite in data_dir: the folder holds patient data
        owner_only_folder(settings.node.data_dir)
    engine = make_engine(settings.node.resolved_database_url, 1, 0, prepare=False)
    try:
        if args.db_command == "upgrade":
            changed = schema.prepare(engine)
            print(f"upgraded the schema from revision {changed[0] or 'none'} to {changed[1]}" if changed else f"the schema is at revision {schema.HEAD} already")
            return 0
        with engine.connect() as conn:
            current = schema.current_revision(conn)
        print(f"database: revision {current or 'none'}; this casemask: revision {schema.HEAD}" + ("" if current == schema.HEAD else " (run `casemask db upgrade`)"))
        return 0 if current == schema.HEAD else 1
    finally:
        engine.dispose()


def _quiet_association_errors(args) -> None:
    """echo and send say in one line of their own when a peer cannot be reached;
    pynetdicom's records about the same refusal repeat it (``-vv`` shows them)."""
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        # ...but its connection failures reach node.scu's filter, which keeps their cause
        # for that line (and drops them)
        logging.getLogger("pynetdicom.transport").setLevel(logging.ERROR)


def _calling_aet(args) -> str:
    """``--calling-aet``, or else the node's own AE title ([node] ae_title of --config,
    CASEMASK in the built-in configuration), as the node calls its destinations."""
    from node.config import valid_ae_title

    if args.calling_aet is None:
        return _settings(args).node.ae_title
    if not valid_ae_title(args.calling_aet):
        raise UsageError(f"--calling-aet {args.calling_aet!r}: an AE title is 1 to 16 characters, no backslash")
    return args.calling_aet


def _rejection_hint(why: str, called: str, calling: str) -> str:
    """What to do about a peer's rejection, beside its reason."""
    if "Calling AE title not recognised" in why:
        return (f"; the peer does not accept calls from {calling!r}: add {calling!r} to its known peers "
                "(Orthanc: DicomModalities; casemask: [[sources]]), or call as a title it knows with --calling-aet")
    if "Called AE title not recognised" in why:
        return f"; the peer's AE title is not {called!r}: write its own before '@'"
    return ""


def cmd_echo(args) -> int:
    from node.scu import echo

    ae, host, port = parse_peer(args.peer)
    calling = _calling_aet(args)
    _quiet_association_errors(args)
    why: list[str] = []
    status = echo(ae, host, port, calling_ae=calling, timeout=args.timeout, why=why)
    if status is None:
        reason = why[0] if why else "refused, rejected or timed out"
        print(f"C-ECHO {args.peer} as {calling}: no association ({reason}){_rejection_hint(reason, ae, calling)}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer} as {calling}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.config import Destination
    from node.scu import DicomSender, Outcome, Work

    ae, host, port = parse_peer(args.to)
    calling = _calling_aet(args)
    _quiet_association_errors(args)
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

    DicomSender(dest, calling).send(work, report)
    for line in failures[:20]:
        print(line, file=sys.stderr)
    hint = next((h for line in failures if (h := _rejection_hint(line, ae, calling))), "")
    print(f"sent {results.get('sent', 0)} of {len(work)} to {args.to} as {calling}" + ("" if not failures else f"; {len(failures)} not sent{hint}"))
    return 0 if not failures else 1


def _require_database(settings, create: bool = False) -> None:
    """Refuse to open a SQLite database that is not there: a command run outside the
    node's folder (the built-in ``data_dir = "var"`` is relative to it) or on another file would make
    an empty one, report an empty node and keep accounts no node reads. ``create``
    (``user add``, ``token create`` before the first start): make it, and say so.

    Raises:
        node.startup.StartupError: no database file, and ``create`` is false (exit 2;
            not UsageError: node.index_cli calls this from ``node.cli`` while ``python
            -m node.cli`` runs it as ``__main__``, whose UsageError is another class).
    """
    from node.config import is_shipped
    from node.startup import StartupError

    url = settings.node.resolved_database_url
    if not url.startswith("sqlite:///"):
        return  # PostgreSQL: made by its admin; the schema check names a wrong one
    db_file = Path(url.removeprefix("sqlite:///"))
    if db_file.exists():
        return
    if is_shipped(settings.source_file):  # its data_dir is relative to the working folder: another folder, another node
        name = "built-in configuration" if settings.source_file is None or Path(settings.source_file).name == "casemask.toml" else Path(settings.source_file).name
        where = f"the {name} in this folder ({Path.cwd()})"
    else:
        where = f"the configuration {settings.source_file}"
    if create:
        print(f"casemask: no database at {db_file} yet ({where}): made a new one; the node started on the same "
              "configuration in this folder uses it", file=sys.stderr)
        return
    if is_shipped(settings.source_file):
        fix = ("Run the command in the folder the node is started in (the built-in data_dir = \"var\" is relative to it), "
               "or give it the node's --config FILE")
    else:
        fix = "Give it the --config FILE the node runs on ([node] data_dir and database_url say where the database is)"
    raise StartupError(f"no database at {db_file}: no node has run on {where} yet. {fix}")


def _service(args, create: bool = False):
    from node.service import Service

    settings = _settings(args)
    _require_database(settings, create)
    return Service.open(settings)


def cmd_status(args) -> int:
    service = _service(args)
    info = service.status()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"node {info['node']}  data {info['data_dir']}  version {info['version']}  disk free {info['disk_free_bytes'] / 2**30:.1f} GiB")
    # The routes and destinations below are this file's: a node started with another --config has others.
    print(f"  configuration {info['config'] or 'built-in'}" + ("" if getattr(args, "config", None) else " (the built-in one: no --config given)"))
    for group, states in info["counts"].items():
        line = "  ".join(f"{k}={v}" for k, v in sorted(states.items())) or "-"
        print(f"  {group:<24} {line}")
        if group == "studies" and info.get("next_study_complete_in_s") is not None:
            print(f"  {'':<24} the first RECEIVING study is complete in about {info['next_study_complete_in_s']} s "
                  f"(once no object came for [node] stable_after_s)")
        dest = group.removeprefix("destination:")
        if group.startswith("destination:") and dest in info.get("not_sent", {}):
            print(f"  {'':<24} last {info['not_sent'][dest]}")
        if group.startswith("destination:") and dest in info.get("next_attempt", {}):
            print(f"  {'':<24} {_next_attempt_line(info['next_attempt'][dest], info['max_attempts'])}")
        if group.startswith("destination:") and dest in info["health"]:
            print(f"  {'':<24} {_health_line(info['health'][dest])}")
    for d in service.settings.destinations:  # configured, nothing sent to it yet: an admin checks a new one is there
        if f"destination:{d.name}" not in info["counts"]:
            print(f"  {'destination:' + d.name:<24} - (no delivery yet)")
            print(f"  {'':<24} {_health_line(info['health'][d.name])}")
    dead = info.get("dead_letters") or {}
    if dead.get("originals"):
        keep = "kept until re-queued (failed_days = -1)" if dead["failed_days"] < 0 else f"deleted after failed_days = {dead['failed_days']}"
        print(f"  {'dead letters':<24} {dead['originals']} originals with a FAILED delivery, the oldest {dead['oldest_days']:.1f} days; {keep}")
    t = info["throughput"]
    print(f"  last hour: received {t['received_last_hour']}, sent {t['sent_last_hour']}")
    from node.pixels import describe_route

    for entry in info["routes"]:
        print(f"  {describe_route(entry)}")
    for name, m in info.get("models", {}).items():
        print(f"  model {name}: backend {m.get('backend')} on {m.get('device')} ({m.get('why', '')})")
    return 0


def _count(n: int, noun: str) -> str:
    """'1 model', '2 models'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _health_line(h: dict | None) -> str:
    """A destination's last health check, for ``casemask status``."""
    if h is None:
        return ("health: not tried yet (a running node checks each destination every 30 s; "
                "casemask config check --destinations FILE tries them now)")
    when = str(h.get("checked_at") or "").replace("T", " ").removesuffix("+00:00")
    return f"health: {'reachable' if h.get('reachable') else 'NOT REACHABLE'} at the node's last check, {when} UTC ({h.get('detail')})"


def _next_attempt_line(nxt: dict, max_attempts: int) -> str:
    """When a destination's waiting deliveries are tried next, for ``casemask status``."""
    at = (nxt["at"] or "")[11:19]
    when = "now" if nxt["in_s"] <= 0 else f"in {nxt['in_s']} s"
    return (f"next attempt {when} ({at} UTC), attempt {nxt['attempts'] + 1} of [node] max_attempts = {max_attempts}; "
            "casemask retry sends now")


def cmd_routes_explain(args) -> int:
    from node.service import Invalid, Service

    settings = _settings(args)
    service = Service(settings, sessions=None)  # type: ignore[arg-type]  # explaining reads no database
    status = 0
    for f in _files(args.files):
        try:
            result = service.explain(f, args.calling_ae)
        except Invalid as exc:
            print(f"{f}: {exc}")
            status = 1
            continue
        matched = result["routes"]
        print(f"{f}: " + (f"routes {', '.join(matched)}" if matched else f"no route matches (unrouted = {result['unrouted']})"))
        for v in result["verdicts"]:
            print(f"  {'MATCH' if v['matched'] else 'no   '} {v['route']}: " + "; ".join(v["reasons"]))
        for route, note in result.get("burned_in", {}).items():
            print(f"  NOTE  {route}: {note}")
    return status


def cmd_retry(args) -> int:
    from node.service import ServiceError, cli_principal

    service = _service(args)
    who = cli_principal()
    try:
        n = service.retry_deliveries(args.destination or "", who)
    except ServiceError as exc:
        raise UsageError(str(exc)) from None
    q = service.retry_quarantined(who) if args.quarantined else 0
    h = service.retry_held(who) if args.held else 0
    print(f"re-queued {n} failed or waiting deliveries" + (f", {q} quarantined jobs" if args.quarantined else "") + (f", {h} held objects (the node routes them again: at once while it runs, else at its next start)" if args.held else ""))
    return 0


def cmd_quarantine(args) -> int:
    """``casemask quarantine list|show|retry|discard``: the quarantine as the dashboard
    and the API show it (:class:`node.service.Service`, which audits every action);
    pseudonymous: row ids, the Study Instance UID the archive receives, reasons that
    name a step and an attribute, never a value."""
    from node.service import ServiceError, cli_principal

    service = _service(args)
    if args.quarantine_command == "list":
        rows = service.quarantine(args.limit)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{len(rows)} quarantined" + (" (casemask quarantine show JOB for one; retry or discard JOB...)" if rows else ""))
        if rows:
            print(f"{'JOB':>7} {'INSTANCE':>8} {'STUDY':>6} {'ROUTE':<12} {'STEP':<10} {'SINCE':<20} {'KEPT':<4} REASON")
        for r in rows:
            job = str(r["job_id"]) if r["job_id"] is not None else "-"
            print(f"{job:>7} {r['instance_id']:>8} {r['study_id']:>6} {r['route'] or '-':<12} {r['step']:<10} {r['updated_at'] or '-':<20} "
                  f"{'yes' if r['original_kept'] else 'no':<4} {r['reason']}")
        return 0
    if args.quarantine_command == "show":
        try:
            info = service.quarantined(instance_id=args.id) if args.instance else service.quarantined(job_id=args.id)
        except ServiceError as exc:
            print(f"casemask: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        for key, value in info.items():
            if key != "record":
                print(f"{key:<24} {value if value is not None else '-'}")
        for step, found in info["record"].items():
            print(f"{'found by ' + step:<24} {json.dumps(found, sort_keys=True)}")
        return 0
    who = cli_principal()
    act = service.retry_job if args.quarantine_command == "retry" else service.discard_job
    status = 0
    for job_id in args.ids:
        try:
            done = act(job_id, who)
        except ServiceError as exc:
            said = str(exc)  # the queue's reasons name the job already ("job 6 is DISCARDED, ...")
            print(f"casemask: {said}" if said.startswith(f"job {job_id}") else f"casemask: job {job_id}: {said}", file=sys.stderr)
            status = 1
            continue
        print(f"job {job_id}: {done['state']}")
    return status


def cmd_purge(args) -> int:
    settings = _settings(args)
    from node import retention
    from node.db import make_engine, make_sessionmaker

    r = settings.retention
    _require_database(settings)
    sessions = make_sessionmaker(make_engine(settings.node.resolved_database_url))
    report = retention.run(sessions, settings, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"retention: {verb} {report.deleted} files, {report.mapping_rows} mapping rows, {report.audit_rows} audit entries")
    for kind in retention.PURGED:  # original, quarantined, held, output, failed, failed-output, orphan
        if report.files[kind]:
            print(f"  {kind:<12} {report.files[kind]:>8} files {report.bytes[kind] / 1e6:10.1f} MB  ({retention.setting_of(kind, settings)})")
    if report.mapping_rows:
        print(f"  mapping      {report.mapping_rows:>8} rows of the pseudonym mapping  (mapping_days = {r.mapping_days})")
    if report.audit_rows:
        print(f"  audit        {report.audit_rows:>8} entries of the audit trail  (audit_days = {r.audit_days})")
    if report.refused:
        print(f"  refused      {report.refused:>8} rows pointing outside the spool and outbox (see the log)")
    failed = report.failed_kept
    if failed.count:
        print(f"  kept         {failed.count:>8} originals with a FAILED delivery (dead letter), the oldest {failed.oldest_days:.0f} days  ({retention.failed_setting(settings)})")
    return 0


def _read_password(prompt_twice: bool = True) -> str:
    """The password from standard input: typed twice at a terminal, else its first line."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if prompt_twice and getpass.getpass("again: ") != first:
            raise UsageError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_user(args) -> int:
    from node import accounts, audit
    from node.accounts import AccountError
    from node.service import cli_principal

    service = _service(args, create=args.user_command == "add")
    who = cli_principal()
    with service.sessions() as session:
        if args.user_command == "list":
            for u in accounts.list_users(session):
                print(f"{u.name:<24} {u.role.value:<9} {'disabled' if u.disabled else ''}")
            return 0
        try:
            if args.user_command == "disable":
                user, action = accounts.disable_user(session, args.name), "disabled"
            else:
                user = accounts.add_user(session, args.name, args.role, _read_password(), replace=args.replace)
                action = "replaced" if args.replace else "added"
        except AccountError as exc:
            raise UsageError(str(exc)) from None
        audit.record(session, "account-changed", actor=who.label, actor_kind=who.kind, object_kind="user", object_ref=user.name,
                     detail={"action": action, "role": user.role.value})
        session.commit()
    print(f"user {args.name} ({user.role.value}) {({'replaced': 'updated'}).get(action, action)}")
    return 0


def cmd_token(args) -> int:
    from node import accounts, audit
    from node.accounts import AccountError
    from node.service import cli_principal

    service = _service(args, create=args.token_command == "create")
    who = cli_principal()
    with service.sessions() as session:
        if args.token_command == "list":
            for t in accounts.list_tokens(session):
                print(f"{t.name:<24} {t.role.value:<9} created {t.created_at:%Y-%m-%d %H:%M}" + (f"  revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else ""))
            return 0
        if args.token_command == "revoke":
            if not accounts.revoke_token(session, args.name):
                raise UsageError(f"no live token named {args.name!r}")
            audit.record(session, "account-changed", actor=who.label, actor_kind=who.kind, object_kind="token", object_ref=args.name, detail={"action": "revoked"})
            session.commit()
            print(f"token {args.name} revoked")
            return 0
        try:
            value = accounts.create_token(session, args.name, args.role)
        except AccountError as exc:
            raise UsageError(str(exc)) from None
        audit.record(session, "account-changed", actor=who.label, actor_kind=who.kind, object_kind="token", object_ref=args.name, detail={"action": "created", "role": str(args.role).lower()})
        session.commit()
    print(value)
    print(f"token {args.name} ({str(args.role).lower()}): shown once, keep it safe; use it as 'Authorization: Bearer <token>'", file=sys.stderr)
    return 0


def cmd_config_check(args) -> int:
    from node.config import ConfigError, load

    if args.file and args.config_file and args.file != args.config_file:
        raise UsageError("give the configuration file once: FILE or --config FILE")
    try:
        s = load(args.file or args.config_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for w in s.warnings:
        print(f"warning: {w}", file=sys.stderr)
    counts = ", ".join(_count(len(items), noun) for items, noun in ((s.sources, "source"), (s.destinations, "destination"), (s.routes, "route"), (s.models, "model")))
    print(f"{s.source_file}: OK ({counts})")
    _print_paths(s)
    print("retention:")
    for line in s.retention.describe():
        print(f"  {line}")
    return _check_destinations(s) if args.destinations else 0


def _config_paths(s) -> list[tuple[str, str]]:
    """Every file and folder the configuration names, as the node resolves it:
    ``(key, absolute path)``, for ``config check``."""
    from node.config import hide_credentials

    n = s.node
    out: list[tuple[str, str]] = [("[node] data_dir", str(n.data_dir))]
    url = n.resolved_database_url
    out.append(("[node] database_url", f"SQLite {url.removeprefix('sqlite:///')}" if url.startswith("sqlite:///") else hide_credentials(url)))
    out.append(("[node] secret_env", f"${n.secret_env} (environment)") if n.secret_env else ("[node] secret_path", str(n.resolved_secret_path)))
    if n.burned_in_regions is not None:
        out.append(("[node] burned_in_regions", str(n.burned_in_regions)))
    if n.tls is not None:
        out += [(f"[node.tls] {k}", str(getattr(n.tls, k))) for k in ("certificate", "private_key", "ca_certificates") if getattr(n.tls, k) is not None]
    for d in s.destinations:
        if d.kind == "folder":
            out.append((f"[[destinations]] '{d.name}' path", str(d.path)))
        if d.tls is not None:
            out += [(f"[[destinations]] '{d.name}' tls.{k}", str(getattr(d.tls, k))) for k in ("ca_certificates", "certificate", "private_key") if getattr(d.tls, k) is not None]
        if d.auth is not None and d.auth.secret_file is not None:
            out.append((f"[[destinations]] '{d.name}' auth.secret_file", str(d.auth.secret_file)))
    for m in s.models:
        out.append((f"[[models]] '{m.name}' path", m.path))
        out += [(f"[[models]] '{m.name}' {k}", str(getattr(m, k))) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(m, k) is not None]
    if s.http.tls is not None:
        out += [(f"[http] tls.{k}", str(getattr(s.http.tls, k))) for k in ("certificate", "private_key")]
    if s.audit.syslog_ca is not None:
        out.append(("[audit] syslog_ca", str(s.audit.syslog_ca)))
    return out


def _print_paths(s) -> None:
    from node.config import base_dir_for, is_shipped

    base = "the working folder, as in every file casemask ships" if is_shipped(s.source_file) else "the configuration file's folder"
    print(f"paths (relative ones in the file are relative to {base}, {base_dir_for(s.source_file)}):")
    paths = _config_paths(s)
    width = max(len(k) for k, _ in paths)
    for key, value in paths:
        print(f"  {key:<{width}}  {value}")


def _check_destinations(s) -> int:
    """``config check --destinations``: try every destination once, now, as the running
    node's health check does (C-ECHO calling as the node, a writable folder, a QIDO-RS
    search); 1 when one is not reachable."""
    from node.config import hide_credentials
    from node.health import probe

    down = 0
    print("destinations:")
    for d in s.destinations:
        h = probe(d, s.node.ae_title, stow=False)
        down += not h.reachable
        where = f"{d.ae_title}@{d.host}:{d.port} as {d.calling_ae or s.node.ae_title}" if d.kind == "dicom" else str(d.path) if d.kind == "folder" else hide_credentials(d.url)
        print(f"  {d.name} ({d.kind}, {where}): {'reachable' if h.reachable else 'NOT REACHABLE'}: {h.detail}")
    if down:
        print("1 destination not reachable: its deliveries wait and are retried (casemask status says why)" if down == 1 else f"{down} destinations not reachable: their deliveries wait and are retried (casemask status says why)", file=sys.stderr)
    return 1 if down else 0


_DEID = None  # the worker process's Deidentifier (set by _deid_worker_init)
_POLICY = None  # the worker process's verifier policy
_BURNED_IN = None  # its node.burnedin.BurnedInStep with --burned-in clean
_STRICT_UIDS = True  # the UI grammar's leading-zero rule ([node] strict_uids of --config)


def _deid_worker_init(deid_settings, secret: bytes, pixels_cleaned: bool, record: bool, regions: Path | None = None, strict_uids: bool = True) -> None:
    from node.deid import Deidentifier, Pseudonymizer
    from node.deid.verify import Policy
    from node.reasons import withhold_library_values

    global _DEID, _POLICY, _BURNED_IN, _STRICT_UIDS
    withhold_library_values()
    _STRICT_UIDS = strict_uids
    _DEID = Deidentifier(deid_settings, Pseudonymizer(secret), pixels_cleaned=pixels_cleaned, record_changes=record)
    _POLICY = Policy.from_options(deid_settings.options)
    if deid_settings.burned_in == "clean":
        from node.burnedin import BurnedInStep

        _BURNED_IN = BurnedInStep(regions)


def _read_dataset(data: bytes):
    """A Part 10 file, or a bare data set as archives hold them (no preamble, no file
    meta): read with force, and accepted only when it has a SOP Class UID."""
    import io

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(io.BytesIO(data))
    except InvalidDicomError:
        ds = dcmread(io.BytesIO(data), force=True)
        if 0x00080016 not in ds._dict or not str(ds.get("SOPClassUID", "")).replace(".", "").isdigit():
            raise
        return ds


def _output_name(ds) -> str:
    """The file name of a de-identified dataset in --out: a digest of its SOP Instance
    UID, never the UID itself (an input may hold anything there, '../' included)."""
    try:
        from node.spool import output_name  # the node's naming, where it has one
    except ImportError:
        import hashlib

        uid = str(ds.get("SOPInstanceUID", "") or "")
        return f"{hashlib.sha256(uid.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.dcm"
    return output_name(ds)


# What makes two objects under one SOP Instance UID the same object, as the node decides
# it (docs/security.md, "SOP Instance UID conflicts"); read from the outputs, whose
# pseudonyms follow from these attributes (the Patient ID's from its issuer too).
_IDENTITY = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "IssuerOfPatientID")


def _identity(ds) -> tuple[str, ...]:
    return tuple(str(ds.get(kw, "") or "").strip("\x00 ") for kw in _IDENTITY)


def _write_new(target: Path, data: bytes, identity: tuple[str, ...]) -> tuple[str, Path]:
    """Write ``data`` at ``target`` unless a file is there: ('ok', path); ('duplicate',
    path) when the file there holds the same bytes, or the same object (``identity``:
    SOP class, study, series and patient; a copy in another transfer syntax, say), and
    this copy is not written; ('conflict', path) when it holds another object under the
    same SOP Instance UID: not written either, since an archive keeps one object per
    SOP Instance UID and would drop or overwrite the second (the node refuses it with
    0xC214).

    A name appears only with its whole content (written under a temporary name, then
    hard-linked, which fails if the name exists): a parallel worker never compares
    with a file another worker is still writing."""
    import os
    import tempfile

    from pydicom import dcmread

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".deid-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o640)
        try:
            os.link(tmp, target)
            return "ok", target
        except FileExistsError:
            if target.read_bytes() == data:
                return "duplicate", target
            there = dcmread(target, stop_before_pixels=True, specific_tags=list(_IDENTITY), force=True)
            return ("duplicate" if _identity(there) == identity else "conflict"), target
    finally:
        os.unlink(tmp)


def _deid_one(job: tuple[str, str, bool]) -> tuple[str, str, str, list]:
    """De-identify and verify one file: (status, source, message or target, diff lines).
    Any failure is this file's status; it never stops the run (no value in messages)."""
    src, out, diff = job
    try:
        return _deid_file(src, out, diff)
    except Exception as exc:  # one bad file: reported in the summary, the run goes on
        return "failed", src, f"{type(exc).__name__} while de-identifying", []


def _deid_file(src: str, out: str, diff: bool) -> tuple[str, str, str, list]:
    from pydicom.errors import InvalidDicomError

    from node.deid import QuarantineError, to_bytes
    from node.deid.verify import VerifyError, reason, verify

    data = Path(src).read_bytes()
    try:
        ds = _read_dataset(data)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return "skipped", src, f"not a DICOM file or data set ({type(exc).__name__})", []
    before = _leaf_values(ds) if diff else {}
    report = None
    if _BURNED_IN is not None:
        from node.burnedin import BurnedInError
        from node.deid.profile import CLEAN_PIXEL_CODE

        try:
            report = _BURNED_IN.clean(ds, _DEID)
        except BurnedInError as exc:
            return "quarantined", src, str(exc), []
    try:
        res = _DEID.apply(ds, extra_codes=[CLEAN_PIXEL_CODE] if report is not None else [])
    except QuarantineError as exc:
        return "quarantined", src, str(exc), []
    bad = _invalid_output_uids(res.dataset)
    if bad:
        return "quarantined", src, f"invalid UID in the output: {', '.join(bad)} (not the PS3.5 UI grammar: digits and dots, at most 64 characters); nothing written", []
    encoded = to_bytes(res.dataset)
    try:
        findings = verify(data, encoded, _POLICY)
    except VerifyError as exc:
        return "quarantined", src, str(exc), []
    if findings:
        return "quarantined", src, reason(findings), []
    status, target = _write_new(Path(out) / _output_name(res.dataset), encoded, _identity(res.dataset))
    lines: list[str] = []
    if diff:
        changed = {p for p, _, _ in res.changes}
        lines = [f"  {act} {path} {kw}" for path, act, kw in res.changes]
        after = _leaf_values(res.dataset)
        # Kept: the same value at the same place in the output. What changed without a line
        # of the profile's is said too: X when it is gone (a private creator whose block was
        # emptied), M when rewritten (the marks, in an object de-identified before).
        same = {path for path, (kw, value) in before.items() if path in after and after[path][1] == value}
        lines += [f"  {'M' if path in after else 'X'} {path} {kw}" for path, (kw, _) in before.items()
                  if path not in same and not _changed(path, changed)]
        places = Counter(kw for kw, _ in before.values())
        kept = Counter(kw for path, (kw, _) in before.items() if path in same and not _changed(path, changed))
        # A keyword kept in one place and changed in another (CodeMeaning in a kept code
        # sequence and in a removed one) is not simply "kept": say in how many places.
        lines.append(f"  kept {len(kept)} attributes: " + ", ".join(
            kw if n == places[kw] else f"{kw} (in {n} of {places[kw]} places)" for kw, n in sorted(kept.items())))
        if report is not None:
            lines.extend(_burned_in_lines(report))
    return status, src, str(target), lines


# The UIDs the node checks on every C-STORE (node.scp); `casemask deid` checks them in
# what it would write, where an option (retain-uids) keeps them as they came.
_CHECKED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _invalid_output_uids(ds) -> list[str]:
    """Keywords (never values) of the checked UIDs in a de-identified data set that do
    not follow the PS3.5 UI grammar; the File Meta's copies included."""
    from node.uid import invalid_uids

    values = {kw: str(ds.get(kw, "") or "").strip("\x00 ") for kw in _CHECKED_UIDS}
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            values[kw] = str(meta.get(kw, "") or "").strip("\x00 ")
    # An object needs its SOP Class and Instance UIDs (Type 1): without one it is no
    # object an archive can keep, and outputs are named and told apart by the latter.
    return invalid_uids(values, _STRICT_UIDS, required=("SOPClassUID", "SOPInstanceUID"))


def _burned_in_lines(report) -> list[str]:
    """--diff lines for the burned-in step: the rules applied and the boxes per frame."""
    lines = [f"  burned-in: {report.frames} frame(s), {len(report.read)} read, rules: {', '.join(report.rules) or 'none'}"]
    for frames, boxes in report.by_frames():
        shown = " ".join(f"[{t},{l},{b},{r}]" for t, l, b, r in boxes)
        label = "frames" if "-" in frames else "frame"
        lines.append(f"  burned-in: {label} {frames}: masked {len(boxes)} box(es) (top,left,bottom,right): {shown}")
    return lines


def _leaf_values(ds, prefix: str = "") -> dict[str, tuple[str, object]]:
    """path -> (keyword, value) of every non-sequence element, at any depth, in --diff's
    notation; values as plain immutable Python values (the profile edits in place)."""
    out: dict[str, tuple[str, object]] = {}
    for elem in ds:
        path = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR == "SQ":
            for k, item in enumerate(elem.value or []):
                out.update(_leaf_values(item, f"{path}[{k}]."))
        else:
            out[path] = (elem.keyword or str(elem.tag), _plain(elem.value))
    return out


def _plain(value: object) -> object:
    if value is None or isinstance(value, (bytes, str, int, float)):
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return tuple(_plain(v) for v in value)  # type: ignore[union-attr]
    return str(value)  # PersonName, DSfloat, IS and the like: compared as written


def _changed(path: str, changed: set[str]) -> bool:
    """Whether the element at ``path`` or a sequence around it was changed."""
    if path in changed:
        return True
    return any(path[:i] in changed for i, c in enumerate(path) if c == "[")


# What pydicom imports when present and `casemask deid` never uses: numpy, and the pixel
# codec plugins it probes at import time. Keeping them out takes a fresh `casemask deid`
# from about 0.25 s to 0.13 s of start-up, which is most of the time on a small folder.
# requests and tqdm are what pydicom.data (imported by pydicom.pixels) uses to download
# its test files: another 0.05 s of CPU (docs/deid.md, "Start-up").
_PIXEL_MODULES = ("numpy", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls", "pyjpegls", "gdcm", "requests", "tqdm")


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


def _deid_settings(args):
    """(DeidSettings, secret path or the node's NodeSettings to read it from, region rules
    file) for `casemask deid`. A borrowed
    route's header profile is used, but never its pixel step: this command touches
    pixels only with --burned-in clean (masking burned-in text), so otherwise the
    burned-in-text policy is that of a header-only route (a route's "clean" included)."""
    deid_settings, secret_path, regions = _deid_route_settings(args)
    if args.burned_in:
        deid_settings = deid_settings.model_copy(update={"burned_in": args.burned_in})
    elif deid_settings.burned_in == "clean":
        deid_settings = deid_settings.model_copy(update={"burned_in": "quarantine"})
    return deid_settings, secret_path, regions


def _deid_route_settings(args):
    from node.config import DeidSettings, load

    if args.config or args.route:
        settings = load(args.config)
        if args.route:
            try:
                route = settings.route(args.route)
            except KeyError:
                raise UsageError(f"no route named {args.route!r} in {settings.source_file}") from None
        else:
            route = next((r for r in settings.routes if r.deid is not None), None)
        deid_settings = route.deid if route and route.deid else DeidSettings()
        if args.option:
            deid_settings = deid_settings.model_copy(update={"options": sorted(set(deid_settings.options) | set(args.option))})
        return deid_settings, Path(args.secret) if args.secret else settings.node, settings.node.burned_in_regions
    return DeidSettings(options=args.option or []), Path(args.secret) if args.secret else Path("var/secret.key"), None


def cmd_deid(args) -> int:
    import os

    if args.burned_in != "clean":  # pixels are decoded only to clean them
        _import_headers_only()
    if args.verify_only:
        return _verify_only(args)
    if not args.out:
        raise UsageError("--out DIR is required (or --verify-only IN OUT)")

    from node.startup import read_secret_file, secret_for_tool

    deid_settings, secret_from, regions = _deid_settings(args)
    strict_uids = True
    if args.config:
        from node.config import load

        strict_uids = load(args.config).node.strict_uids
    # --secret FILE, or the node's own secret (its secret_env or secret_path) with --config
    secret = read_secret_file(secret_from) if isinstance(secret_from, Path) else secret_for_tool(secret_from)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in _files(args.paths)]
    jobs = [(f, str(out), args.diff) for f in files]
    n_jobs = args.jobs or os.cpu_count() or 1
    init = (deid_settings, secret, False, args.diff, regions, strict_uids)  # never pixels_cleaned: see _deid_settings
    # The pixel step's runtime may start threads, which a fork does not carry: with it,
    # each worker builds its own; without it, the profile is compiled once, here, and
    # the forked workers inherit it (and every cache it has filled).
    fork_ready = deid_settings.burned_in != "clean"
    if fork_ready or n_jobs == 1 or len(files) < 32:
        _deid_worker_init(*init)
    if n_jobs > 1 and len(files) >= 32:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork")
        setup = {} if fork_ready else {"initializer": _deid_worker_init, "initargs": init}
        with ProcessPoolExecutor(n_jobs, mp_context=ctx, **setup) as pool:
            results = list(pool.map(_deid_one, jobs, chunksize=max(1, len(jobs) // (n_jobs * 8))))
    else:
        results = [_deid_one(j) for j in jobs]
    return _deid_summary(results, out, args.diff)


def _deid_summary(results, out: Path, diff: bool) -> int:
    counts = dict.fromkeys(("ok", "duplicate", "conflict", "quarantined", "skipped", "failed"), 0)
    for status, src, msg, lines in results:
        counts[status] += 1
        if status == "ok":
            if diff:
                print(f"== {src} -> {msg}")
                print("\n".join(lines))
        elif status == "duplicate":
            print(f"duplicate {src}: the same object is already in {msg}; not written again", file=sys.stderr)
        elif status == "conflict":
            print(f"conflict {src}: another object (other SOP class, patient, study or series) has the same SOP Instance UID "
                  f"and is in {msg}; not written (an archive keeps one object per SOP Instance UID)", file=sys.stderr)
        else:
            print(f"{status} {src}: {msg}", file=sys.stderr)
    print(
        f"de-identified {counts['ok']}, duplicates {counts['duplicate']}, conflicts {counts['conflict']}, "
        f"quarantined {counts['quarantined']}, skipped {counts['skipped']}, failed {counts['failed']}; output in {out}",
        file=sys.stderr,
    )
    return 0 if counts["ok"] + counts["duplicate"] == len(results) else 1


def _verify_only(args) -> int:
    """`casemask deid --verify-only IN OUT`: the verifier on pairs made by any tool (two
    files, or two folders whose files pair up by relative path)."""
    from node.deid.verify import Policy, VerifyError, reason, verify

    if len(args.paths) != 2:
        raise UsageError("--verify-only takes two paths: the original and the de-identified file (or folders)")
    src, dst = map(Path, args.paths)
    if src.is_file() and dst.is_file():
        pairs = [(src, dst)]
    elif src.is_dir() and dst.is_dir():
        pairs = [(f, dst / f.relative_to(src)) for f in _files([str(src)]) if (dst / f.relative_to(src)).is_file()]
    else:
        raise UsageError(f"{src} and {dst}: give two files or two folders")
    if not pairs:
        raise UsageError(f"no file of {src} has a file at the same relative path in {dst}")
    policy = Policy.from_options(args.option or [])
    leaks = unreadable = 0
    for a, b in pairs:
        try:
            findings = verify(a.read_bytes(), b.read_bytes(), policy)
        except VerifyError as exc:
            unreadable += 1
            print(f"unreadable {a} / {b}: {exc}", file=sys.stderr)
            continue
        if findings:
            leaks += 1
            print(f"LEAK {b}: {reason(findings)}")
    print(f"verified {len(pairs)} pairs: {leaks} with identifying values of their original, {unreadable} unreadable", file=sys.stderr)
    return 0 if not leaks and not unreadable else 1


def cmd_export_mapping(args) -> int:
    """The mapping an honest broker needs, written owner-only (folder 0700, files 0600);
    see :mod:`node.mapping`. The export is audited."""
    from node.mapping import MappingError
    from node.service import cli_principal

    out = Path(args.out)
    try:
        counts = _service(args).export_mapping(out, cli_principal(), overwrite=args.force)
    except MappingError as exc:
        raise UsageError(str(exc)) from None
    for name, n in counts.items():
        print(f"{out / name}: {_count(n, 'row')}")
    return 0


class _ShowVersion(argparse.Action):
    """``--version``: print ``casemask X.Y.Z`` and exit 0 (the installed package's version,
    read only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from node.service import version

        print(f"casemask {version()}")
        parser.exit()


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option that has a default says it in ``--help``: ``(default: X)`` is added
    to a help text that does not already name its default (a flag's default, off, and an
    option without one, or an empty one, are not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or "default" in text or d is None or d is False or d == "" or d is argparse.SUPPRESS
                or d == [] or isinstance(action, (argparse._StoreConstAction, argparse._CountAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _RawEpilogFormatter(_DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`_DefaultsFormatter` that keeps the line breaks of a description or epilog
    written as a paragraph of its own."""


class _Parser(argparse.ArgumentParser):
    """Every subcommand also takes ``-v`` after its name (``casemask status -v`` as well as
    ``casemask -v status``): argparse builds each subparser with the class of its parent,
    and each shows its options' defaults (:class:`_DefaultsFormatter`)."""

    def __init__(self, *args, root: bool = False, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        if not root:
            self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-v info, -vv debug)")


_EPILOG = """\
Most commands take --config FILE: the node's TOML configuration (default: the built-in
config/casemask.toml, whose data_dir "var" is relative to the current folder: run them
where the node is started). Relative paths in a FILE are relative to the FILE's folder.
Check a file with 'casemask config check FILE' (it prints every path as resolved) before
'casemask serve --config FILE'. Each command has --help. Exit status: 0 success, 1 the
operation failed, 2 bad usage or configuration. Manual: README.md."""

_SERVE_DESCRIPTION = """\
Receive, de-identify and forward until stopped. Once it listens it prints 'casemask AE
(role) listening on HOST:PORT; data in DIR; pid N'. Ctrl-C, SIGTERM or 'kill N' stops it
(work in progress is taken up again at the next start); 'kill -HUP N' re-reads the
configuration file (a file with a problem changes nothing; the log says which keys need a
restart). Check the file first: 'casemask config check FILE'."""


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line help as one, so that
    `casemask status --help` says what the command does, not only its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    text = helps[name]
                    sub.description = text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
                _describe(sub)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="casemask", description="DICOM de-identification node.", epilog=_EPILOG, root=True,
                formatter_class=_RawEpilogFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    p.add_argument("--version", action=_ShowVersion, help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c", metavar="FILE", help="TOML configuration (default: the built-in config/casemask.toml)")
        return sp

    sp = with_config(sub.add_parser("serve", help="receive, de-identify and forward until stopped", description=_SERVE_DESCRIPTION,
                                    formatter_class=_RawEpilogFormatter))
    sp.add_argument("--role", choices=("all", "ingest", "worker"), default="all",
                    help="all (default): everything; ingest: receive only (SCP and HTTP); worker: route, process, dispatch, retention (see docs/cluster.md)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("db", help="the database's schema (Alembic migrations)")
    dsub = sp.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    with_config(dsub.add_parser("upgrade", help="upgrade the schema to this version's (the node does it at start when safe)")).set_defaults(func=cmd_db)
    with_config(dsub.add_parser("current", help="the database's schema revision and this version's (exit 1 when they differ)")).set_defaults(func=cmd_db)

    calling_help = ("the AE title to call as, as echoscu's -aet; the peer must know it (default: the node's own, [node] ae_title "
                    "of --config: CASEMASK in the built-in configuration)")
    sp = with_config(sub.add_parser("echo", help="C-ECHO a DICOM peer"))
    sp.add_argument("peer", metavar="AE@HOST:PORT", help="the peer's AE title, host and port, e.g. ARCHIVE@127.0.0.1:104")
    sp.add_argument("--calling-aet", "-aet", "--calling-ae", dest="calling_aet", metavar="AE", help=calling_help)
    sp.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="association and reply timeout (default: 10)")
    sp.set_defaults(func=cmd_echo)

    sp = with_config(sub.add_parser("send", help="C-STORE files or folders to a DICOM peer"))
    sp.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (recursed); each file is proposed in its own transfer syntax")
    sp.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the peer's AE title, host and port, e.g. CASEMASK@127.0.0.1:11112")
    sp.add_argument("--calling-aet", "-aet", "--calling-ae", dest="calling_aet", metavar="AE", help=calling_help)
    sp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="association and per-object reply timeout (default: 30)")
    sp.set_defaults(func=cmd_send)

    sp = with_config(sub.add_parser("status", help="counts per state and per destination",
                                    description="Counts per state and per destination: why a destination's objects wait and when it tries "
                                                "next, when a receiving study is complete, throughput, free disk, each route's pixels "
                                                "step. Reads the database of the node on --config (run it in the node's folder)."))
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("routes", help="inspect routing")
    rsub = sp.add_subparsers(dest="routes_command", metavar="SUBCOMMAND", required=True)
    ex = with_config(rsub.add_parser("explain", help="which routes each file matches and why; sends nothing"))
    ex.add_argument("files", nargs="+", metavar="FILE", help="DICOM files to test against the routes (read only)")
    ex.add_argument("--calling-ae", default="", help="calling AE title to assume for calling_ae conditions (default: none, so that a route matching on calling_ae does not match)")
    ex.set_defaults(func=cmd_routes_explain)

    sp = with_config(sub.add_parser("retry", help="re-queue FAILED deliveries, send waiting ones now (and quarantined or held objects)"))
    sp.add_argument("--destination", metavar="NAME", help="only this destination")
    sp.add_argument("--quarantined", action="store_true", help="also re-process quarantined objects")
    sp.add_argument("--held", action="store_true", help="also route held objects (matched no route) again")
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser("quarantine", help="quarantined objects: list, show one, retry or discard (audited)")
    qsub = sp.add_subparsers(dest="quarantine_command", metavar="SUBCOMMAND", required=True)
    ql = with_config(qsub.add_parser("list", help="quarantined jobs and objects, newest first: ids, study, route, step, when, reason (no PHI)"))
    ql.add_argument("--limit", type=int, default=500, metavar="N", help="at most N of each kind (default: 500)")
    ql.add_argument("--json", action="store_true", help="machine-readable output (what GET /api/v1/quarantine answers)")
    qs = with_config(qsub.add_parser("show", help="one quarantined job: reason, what the steps found, when its original is deleted"))
    qs.add_argument("id", type=int, metavar="JOB", help="a job id from 'quarantine list' (with --instance: an instance id)")
    qs.add_argument("--instance", action="store_true", help="JOB is the id of an instance quarantined before routing (it has no job)")
    qs.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("retry", "process these quarantined jobs again (after fixing the cause); 'casemask retry --quarantined' takes all"),
                       ("discard", "give up on these quarantined jobs: nothing of them is ever sent")):
        qa = with_config(qsub.add_parser(name, help=text))
        qa.add_argument("ids", nargs="+", type=int, metavar="JOB", help="job ids from 'quarantine list'")
    sp.set_defaults(func=cmd_quarantine)

    sp = with_config(sub.add_parser("purge", help="delete what retention says is due now ([retention]); rows stay"))
    sp.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    sp.set_defaults(func=cmd_purge)

    sp = sub.add_parser("user", help="dashboard accounts")
    usub = sp.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)
    ua = with_config(usub.add_parser("add", help="add a user (password from standard input)",
                                     description="The password (10 characters or more) is asked twice at a terminal, else read from the first line of standard input: echo PASSPHRASE | casemask user add NAME --role R."))
    ua.add_argument("name", metavar="NAME", help="the login name")
    ua.add_argument("--role", required=True, choices=["viewer", "operator", "admin"], help="viewer reads; operator also retries and discards; admin also changes configuration and exports mappings")
    ua.add_argument("--replace", action="store_true", help="set a new password and role for an existing user")
    ua.set_defaults(func=cmd_user)
    ul = with_config(usub.add_parser("list", help="list users"))
    ul.set_defaults(func=cmd_user)
    ud = with_config(usub.add_parser("disable", help="lock a user out now (logins refused, sessions ended); 'add --replace' lets them in again"))
    ud.add_argument("name", metavar="NAME", help="the login name")
    ud.set_defaults(func=cmd_user)

    sp = sub.add_parser("token", help="API bearer tokens")
    tsub = sp.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    tc = with_config(tsub.add_parser("create", help="make a token and print it once"))
    tc.add_argument("--name", required=True, metavar="NAME", help="a name to recognise and revoke the token by, e.g. prometheus")
    tc.add_argument("--role", required=True, choices=["viewer", "operator", "admin"], help="what the token may do, as for users")
    tc.set_defaults(func=cmd_token)
    tr = with_config(tsub.add_parser("revoke", help="revoke a token"))
    tr.add_argument("name", metavar="NAME", help="the token's name (casemask token list)")
    tr.set_defaults(func=cmd_token)
    tl = with_config(tsub.add_parser("list", help="list tokens (names and roles; values are never shown again)"))
    tl.set_defaults(func=cmd_token)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    ck = csub.add_parser("check", help="validate a configuration file",
                         description="Validate a configuration file: every problem at once, each with what to write instead "
                                     "(exit 2), warnings about valid but suspicious settings, every file and folder it names "
                                     "as the node resolves it (relative paths: relative to FILE's folder), and what retention "
                                     "deletes when (exit 0). A running node re-reads the file on 'kill -HUP PID'.")
    ck.add_argument("file", nargs="?", metavar="FILE", help="default: the built-in config")
    ck.add_argument("--config", "-c", dest="config_file", metavar="FILE", help="the same as FILE (as the other commands take it)")
    ck.add_argument("--destinations", action="store_true",
                    help="also try each destination now, as the node does (dicom: C-ECHO calling as the node; folder: writable; "
                         "dicomweb: a QIDO-RS search); exit 1 when one is not reachable")
    ck.set_defaults(func=cmd_config_check)

    sp = sub.add_parser("deid", help="de-identify files with a route's header profile, and verify each output")
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursed); with --verify-only: ORIGINAL DEIDENTIFIED")
    sp.add_argument("--out", metavar="DIR", help="where the outputs go (required unless --verify-only)")
    sp.add_argument("--verify-only", action="store_true", help="only run the verifier on pairs made by any tool: IN OUT (files, or folders paired by relative path)")
    sp.add_argument("--config", "-c", metavar="FILE", help="the configuration whose routes --route names (default: the built-in config)")
    sp.add_argument("--route", metavar="NAME", help="use this route's deid settings (default: basic profile)")
    sp.add_argument("--option", action="append", metavar="OPTION", help="profile option, e.g. retain-longitudinal-modified-dates (repeatable)")
    sp.add_argument("--secret", metavar="FILE", help="pseudonym secret (default: the node's)")
    sp.add_argument("--burned-in", choices=["quarantine", "allow", "clean"], help="burned-in text policy (default: the route's, 'clean' only with this flag); clean masks the text (docs/burned-in.md)")
    sp.add_argument("--diff", action="store_true", help="print every attribute changed, removed or kept, and the boxes masked per frame")
    sp.add_argument("--jobs", "-j", type=int, default=0, metavar="N", help="worker processes (default: one per CPU core)")
    sp.set_defaults(func=cmd_deid)

    sp = with_config(sub.add_parser("export-mapping", help="write uids.csv and patients.csv for an honest broker (owner-only)"))
    sp.add_argument("--out", required=True, metavar="DIR", help="a folder for uids.csv and patients.csv (made owner-only); the files hold PHI")
    sp.add_argument("--force", action="store_true", help="overwrite uids.csv and patients.csv of an earlier export in DIR (refused without it)")
    sp.set_defaults(func=cmd_export_mapping)

    from node.index_cli import add_index_parsers

    add_index_parsers(sub, with_config)
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
    _describe(p)
    return p


# Packages of pyproject.toml's extras that some commands import (the engine's training
# tools: PyTorch) and `make serve`'s node-only virtualenv leaves out, by extra.
_EXTRAS = {"torch": "train", "h5py": "train", "tensorrt": "tensorrt", "tritonclient": "triton", "faiss": "ann"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose if args.command != "serve" else max(1, args.verbose))
    from node.config import ConfigError
    from node.startup import StartupError

    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader that left is caught below, not at exit
        return status
    except (ConfigError, StartupError) as exc:
        print(f"casemask: {exc}" if isinstance(exc, StartupError) else exc, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"casemask: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"casemask {args.command}: needs the Python package {exc.name!r}, which the node's own virtualenv "
              f"(make serve) leaves out: install it with 'make venv' in the clone (elsewhere: pip install 'casemask[{extra}]')",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `casemask status | head -3`: the reader left. Python's own way out prints a
        # traceback and then "Exception ignored ... BrokenPipeError" at exit; a pipe that
        # closes early is no error of the command (what `ls | head` does: quiet).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by it


if __name__ == "__main__":
    sys.exit(main())

"""What an admin reads when something is not as it should be: every command's options
with their defaults in ``--help``, a DICOMweb destination's health that says what failed,
one line (the node's) per failed attempt to a destination that is down, and an HTTP
server that did not start saying what is known."""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import subprocess
import sys
import time
import types

import pytest

from node.cli import build_parser
from tests.conftest import ROOT, free_port, node_config, write_toml


def _parsers(parser: argparse.ArgumentParser, name: str = "casemask"):
    """Every parser of the command tree, with its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def _shows(text: str, default) -> bool:
    values = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
    return any(v in text for v in values)


def test_every_option_with_a_default_shows_it_in_help():
    """`casemask similar --help` said `--k K  how many cases (1 to 100)` and `demo --help`
    `--timeout TIMEOUT  seconds to wait...`: neither said its default. Every option of
    every command that has a default (a number, a word; not a flag's off, not an empty
    one) names it."""
    missing = []
    for cmd, parser in _parsers(build_parser()):
        helps = parser.format_help()
        formatter = parser._get_formatter()
        for action in parser._actions:
            d = action.default
            if (not action.option_strings or d in (None, False, "", [], argparse.SUPPRESS) or action.help == argparse.SUPPRESS
                    or isinstance(action, (argparse._StoreConstAction, argparse._CountAction))):
                continue
            text = (formatter._get_help_string(action) or "") % {"default": d, **vars(action)}
            if "default" not in text or not _shows(text, d) or action.option_strings[0] not in helps:
                missing.append(f"{cmd} {action.option_strings[0]}")
    assert not missing, missing
    assert "(default: 5)" in " ".join(dict(_parsers(build_parser()))["casemask similar"].format_help().split())
    assert "(default: 120" in " ".join(dict(_parsers(build_parser()))["casemask demo"].format_help().split())


def test_a_dicomweb_destination_is_reachable_only_when_its_service_answers(tmp_path, orthanc_dicomweb):
    """The probe counted any HTTP answer as reachable: a url with a wrong path (Orthanc's
    404) read `reachable, HTTP 404` while every STOW-RS would fail. Now a QIDO-RS search
    answered 2xx is reachable; a 404 is not, and says to check the url; no server at all
    says it cannot reach it."""
    from node.config import Destination
    from node.health import probe

    def health(url: str):
        return probe(Destination(name="web", kind="dicomweb", url=url), "CASEMASK", timeout_s=10)

    good = health(orthanc_dicomweb.base_url + "/dicom-web")
    assert good.reachable and "HTTP 200" in good.detail, good
    wrong = health(orthanc_dicomweb.base_url + "/not-dicom-web")
    assert not wrong.reachable and "HTTP 404" in wrong.detail and "check url" in wrong.detail, wrong
    nobody = health(f"http://127.0.0.1:{free_port()}/dicom-web")
    assert not nobody.reachable and "cannot reach" in nobody.detail, nobody


def test_a_destination_that_is_down_costs_one_log_line_with_its_cause(tmp_path, start_node, caplog):
    """Each failed attempt to a dicom destination that is down logged pynetdicom's two
    ERROR lines ("Association request failed: unable to connect to remote", "TCP
    Initialisation Error: [Errno 111] Connection refused") beside the node's own. Now only
    the node's line, naming the destination and the cause."""
    from pydicom import dcmread

    from tests.conftest import make_study, receive

    caplog.set_level(logging.WARNING)
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    node = start_node(raw)
    receive(node, dcmread(make_study(tmp_path / "s", 1)[0]))
    from tests.conftest import wait_until

    wait_until(lambda: "destination pacs: down" in caplog.text, timeout=60, what="the node's line for the destination that is down")
    wait_until(lambda: "still down" in caplog.text or caplog.text.count("retrying") >= 1, timeout=30, what="a retry")
    ours = [r for r in caplog.records if "destination pacs: down" in r.getMessage()]
    assert "Connection refused" in ours[0].getMessage(), ours[0].getMessage()
    theirs = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    assert not theirs, theirs
    # What an admin reads next: `casemask status` says why the destination's objects
    # wait (it showed only RETRY_WAIT=1), and its health says what failed ("no association").
    from node.health import probe

    config = write_toml(raw, tmp_path / "node.toml")
    wanted = r"destination:pacs .*RETRY_WAIT=1\n +last RETRY_WAIT: cannot connect to PACS@127\.0\.0\.1:\d+ \(Connection refused\)"

    def status_says_why() -> bool:  # the running node retries: between attempts the delivery is RETRY_WAIT, during one SENDING
        r = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        return r.returncode == 0 and re.search(wanted, r.stdout) is not None

    wait_until(status_says_why, timeout=60, interval=0.5, what="casemask status naming why the delivery waits")
    h = probe(node.settings.destinations[0], "CASEMASK")
    assert not h.reachable and h.detail == "no association (cannot connect: Connection refused)", h


def test_the_http_server_says_what_is_known_when_it_does_not_start(tmp_path, start_node, monkeypatch):
    """`could not listen on ... (in use?)` was said both when the port was taken and when
    a loaded machine had not started the server within 20 s. Now a taken port is named
    as such, and a server still starting says so and that nothing said the port is taken."""
    import uvicorn

    from node.http.server import HttpServer

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    node = start_node(raw, listen=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", raw["http"]["port"]))
        holder.listen()
        with pytest.raises(RuntimeError) as taken:
            HttpServer(node).start()
    assert "in use by another program" in str(taken.value) and "[http] host and port" in str(taken.value)

    def slow_run(self, sockets=None):  # a server that has not got to listening yet
        while not self.should_exit:
            time.sleep(0.05)

    monkeypatch.setattr(uvicorn.Server, "run", slow_run)
    with pytest.raises(RuntimeError) as slow:
        HttpServer(node).start(timeout_s=0.5)
    assert "still starting after" in str(slow.value) and "in use" not in str(slow.value), str(slow.value)


def test_a_first_start_says_it_made_a_new_database(tmp_path, caplog):
    """A new admin's first `make serve` said "database schema upgraded from revision none
    (empty, or made before migrations) to 0003": a new database is now called one."""
    from node.db import make_engine
    from node.schema import HEAD

    caplog.set_level(logging.INFO, logger="node.schema")
    make_engine(f"sqlite:///{tmp_path / 'casemask.db'}").dispose()  # as the node's start makes it
    assert f"new database: schema made at revision {HEAD}" in caplog.text and "upgraded" not in caplog.text, caplog.text


def test_export_mapping_refuses_to_overwrite_an_earlier_export_without_force(tmp_path):
    """`casemask export-mapping --out DIR` wrote over the uids.csv and patients.csv of an
    earlier export in DIR (perhaps the only copy of rows retention has since aged out).
    Now it refuses with exit 2, naming the files and `--force`, changes nothing and
    audits nothing; with `--force` it writes them again."""
    from node import audit
    from node.config import load
    from node.service import Service

    cfg = write_toml(node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path / "n.toml")

    def casemask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)

    assert casemask("db", "upgrade").returncode == 0
    out = tmp_path / "mapping"
    assert casemask("export-mapping", "--out", str(out)).returncode == 0
    (out / "uids.csv").write_text("kept\n")
    r = casemask("export-mapping", "--out", str(out))
    assert r.returncode == 2 and "already holds uids.csv and patients.csv" in r.stderr and "--force" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and (out / "uids.csv").read_text() == "kept\n"
    assert "--force" in casemask("export-mapping", "--help").stdout
    r = casemask("export-mapping", "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "uids.csv").read_text().startswith("level,") and (out / "uids.csv").stat().st_mode & 0o777 == 0o600
    events = [e["event"] for e in Service.open(load(cfg)).audit(audit.Filter())]
    assert events.count("mapping-exported") == 2, events


def test_no_help_text_shows_an_empty_or_misleading_default():
    """The walk's `--help` of every command: `engine train --no-gates  skip fitting the
    gates (default: True)` read as if the gates were skipped by default, `--bundle DIR
    ... (default: OUT/bundle) (default: None)` named two defaults, `routes explain
    --calling-ae` said `(default: )`, and `--batch-size`, `--lr`, ... said nothing at all.
    Now no help text shows an empty, None or flag default, none names two, and every
    option with a default says it in the text printed (not only in the help string)."""
    bad = []
    for cmd, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for shown in ("(default: None)", "(default: )", "(default: True)", "(default: False)"):
            if shown in text:
                bad.append(f"{cmd}: {shown}")
        bad += [f"{cmd}: two defaults" for m in re.finditer(r"\(default: [^()]*\) \(default:", text)]
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS) and action.help != argparse.SUPPRESS \
                    and not isinstance(action, (argparse._StoreConstAction, argparse._CountAction)) and not action.help:
                bad.append(f"{cmd} {action.option_strings[0]}: no help text, so its default is not printed")
    assert not bad, bad


def test_echo_to_a_peer_that_rejects_says_why(archive_factory):
    """`casemask echo WRONG@host:port` (and a dicom destination's health) said only
    `no association (association rejected)`: the admin could not tell a wrong called AE
    title from their own AE title missing at the peer. Now the peer's reason is said."""
    archive = archive_factory(require_calling=["SOMEONE"])
    r = subprocess.run([sys.executable, "-m", "node.cli", "echo", f"ARCHIVE@127.0.0.1:{archive.port}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "association rejected (Rejected Permanent: Calling AE title not recognised)" in r.stdout + r.stderr, r.stdout + r.stderr


def test_status_lists_a_destination_that_has_no_delivery_yet(tmp_path):
    """The walk added a destination and ran `casemask status`: it listed only the
    destinations that had deliveries, so the new one seemed not to be taken. Now every
    configured destination has its line."""
    dests = [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}, {"name": "newarchive", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104}]
    cfg = write_toml(node_config(tmp_path, dests), tmp_path / "n.toml")
    run = [sys.executable, "-m", "node.cli"]
    assert subprocess.run([*run, "db", "upgrade", "--config", str(cfg)], capture_output=True, cwd=ROOT, timeout=120).returncode == 0
    r = subprocess.run([*run, "status", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"destination:newarchive +- \(no delivery yet\)", r.stdout) and re.search(r"destination:out +- \(no delivery yet\)", r.stdout), r.stdout


def test_status_says_when_the_next_attempt_is_and_when_a_receiving_study_is_complete(tmp_path, start_node):
    """`casemask status` said `RETRY_WAIT=1` and why, but not when the node tries again:
    with the backoff doubling up to retry_max_s an admin could not tell a node that waits
    from one that is stuck. And `RECEIVING=1` did not say when the study would go on.
    Now both are said: the next attempt's time and number (of max_attempts), and in how
    many seconds the first receiving study is complete."""
    from pydicom import dcmread

    from tests.conftest import make_study, receive

    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
                      stable_after_s=600, retry_base_s=300, retry_max_s=600, max_attempts=7)
    node = start_node(raw, listen=False, schedule=False)
    first, second = make_study(tmp_path / "a", 1), make_study(tmp_path / "b", 1)
    receive(node, dcmread(first[0]))
    node.tick(stable_after_s=0)  # routed, processed, one attempt to a port nobody listens on
    receive(node, dcmread(second[0]))  # a second study, still receiving
    config = write_toml(raw, tmp_path / "node.toml")
    r = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"destination:pacs +RETRY_WAIT=1\n +last RETRY_WAIT: .*\n +next attempt in (\d+) s \(\d\d:\d\d:\d\d UTC\), attempt 2 of \[node\] max_attempts = 7", r.stdout)
    assert m and 200 <= int(m.group(1)) <= 300, r.stdout  # the first backoff is retry_base_s
    m = re.search(r"studies +.*RECEIVING=1.*\n +the first RECEIVING study is complete in about (\d+) s", r.stdout)
    assert m and 500 <= int(m.group(1)) <= 600, r.stdout
    info = node_service_status(config)
    assert info["next_attempt"]["pacs"]["attempts"] == 1 and info["max_attempts"] == 7, info


def node_service_status(config) -> dict:
    """What `casemask status --json` prints."""
    import json

    r = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    """`casemask status | head -4` ended in a BrokenPipeError traceback (Python's, from
    print) once head had its lines. Now the command ends quietly, with 141 (128 +
    SIGPIPE) as a shell reports for `yes | head -1`."""
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "config", "check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the command writes its first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, (proc.returncode, err.decode())


def test_a_store_only_dicomweb_account_is_asked_to_store_nothing_every_ten_minutes_not_every_check(tmp_path, monkeypatch, caplog):
    """The health check of a DICOMweb account that may store but not search (QIDO-RS
    403) posted an empty STOW-RS request every 30 s: 2880 uploads of nothing a day in the
    archive's log. Now the empty request goes once per STOW_PROBE_EVERY_S; the checks in
    between take the search's 403 as the server still there. A destination that is wrong
    from the start is said in the log at the first check (it was said only on a change)."""
    import threading
    import types
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from node import health
    from node.config import parse

    posts: list[str] = []
    broken = [False]

    class Archive(BaseHTTPRequestHandler):  # a store-only account: searches 403, uploads 200
        def do_GET(self):
            self.send_response(503 if broken[0] else 403 if self.path.startswith("/dicom-web/") else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posts.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clock = [1000.0]
    monkeypatch.setattr(health, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    try:
        url = f"http://127.0.0.1:{server.server_port}/dicom-web"
        dests = [{"name": "web", "kind": "dicomweb", "url": url},
                 {"name": "nowhere", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web"}]
        monitor = health.HealthMonitor(parse(node_config(tmp_path, dests), "test", base_dir=tmp_path))
        caplog.set_level(logging.INFO, logger="node.health")
        monitor.check_all()
        assert posts == ["/dicom-web/studies"] and monitor.get("web").reachable, (posts, monitor.get("web"))
        assert [r.getMessage() for r in caplog.records] == [
            f"destination nowhere: unreachable at the first check ({monitor.get('nowhere').detail})"], caplog.text
        for _ in range(5):  # 2.5 minutes of checks every 30 s
            clock[0] += 30
            monitor.check_all()
        assert len(posts) == 1 and monitor.get("web").reachable and "may not search" in monitor.get("web").detail, (posts, monitor.get("web"))
        assert len(caplog.records) == 1, caplog.text  # still unreachable: no new line
        clock[0] += health.STOW_PROBE_EVERY_S
        monitor.check_all()
        assert len(posts) == 2 and monitor.get("web").reachable, posts
        # Down, then back: a WARNING going, an INFO coming back (the node's way for what recovered).
        broken[0] = True
        clock[0] += 30
        monitor.check_all()
        broken[0] = False
        clock[0] += 30
        monitor.check_all()
        web = [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if "destination web" in r.getMessage()]
        assert web == [(logging.WARNING, "destination web: unreachable"), (logging.INFO, "destination web: reachable again")], web
        assert len(posts) == 3, posts  # back from unreachable: the empty STOW-RS is asked again
    finally:
        server.shutdown()
        server.server_close()


def test_the_dashboards_own_refresh_is_logged_at_debug(tmp_path, caplog):
    """An open dashboard re-fetches its page every 3 to 10 s: each was an INFO line of
    the access log (`GET /destinations 200`), hundreds an hour burying the requests an
    admin looks for. The refresh says so in a header; its successful GETs are DEBUG. A
    page opened by hand, and a refresh refused, stay INFO."""
    from tests.httpnode import start_http_node

    from node import accounts

    hn = start_http_node(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path)
    try:
        with hn.node.sessions() as s:
            accounts.add_user(s, "alice", "viewer", "a long passphrase")
            s.commit()
        with hn.client() as viewer, hn.client() as anonymous:
            token = re.search(r'name="login_token" value="([^"]+)"', viewer.get("/login").text).group(1)
            assert viewer.post("/login", data={"name": "alice", "password": "a long passphrase", "login_token": token}).status_code == 303
            caplog.set_level(logging.DEBUG, logger="node.http.app")
            caplog.clear()
            assert viewer.get("/destinations", headers={"X-Casemask-Refresh": "1"}).status_code == 200
            assert viewer.get("/studies").status_code == 200
            assert anonymous.get("/quarantine", headers={"X-Casemask-Refresh": "1"}).status_code in (303, 401)
        from tests.conftest import wait_until

        def lines() -> dict[str, int]:  # the access log writes its line once the answer is sent: it may come after the client has it
            return {r.getMessage().split(" - ")[1]: r.levelno for r in caplog.records if r.name == "node.http.app" and '"GET ' in r.getMessage()}

        wait_until(lambda: len(lines()) == 3, timeout=30, what="the three GETs in the access log")
        got = lines()
        assert got['"GET /destinations" 200'] == logging.DEBUG and got['"GET /studies" 200'] == logging.INFO, got
        (refused,) = [k for k in got if "/destinations" not in k and "/studies" not in k]
        assert refused.endswith(("303", "401")) and got[refused] == logging.INFO, got  # a refusal stays INFO
        script = (ROOT / "node" / "http" / "static" / "app.js").read_text()
        assert '"X-Casemask-Refresh": "1"' in script  # what the dashboard's refresh sends
    finally:
        hn.node.stop()


def test_a_rejected_sender_is_told_apart_from_a_stranger_when_only_case_or_host_differs(tmp_path):
    """A modality set up as `cr_room7` for a source written `CR_ROOM7` was logged as `is
    not in [[sources]]`, like a stranger: the admin read the list, saw CR_ROOM7 there, and
    was lost. Now the line says which entry differs only in case (AE titles are
    case-sensitive), and a known AE title from another address says where it is allowed."""
    from node.admission import REJECT_CALLING_AE, AccessPolicy
    from node.config import parse

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["sources"] = [{"ae_title": "CR_ROOM7", "host": "127.0.0.1"}, {"ae_title": "MODALITY1"}]
    policy = AccessPolicy(parse(raw, "test", base_dir=tmp_path))
    assert policy.check("CR_ROOM7", "CASEMASK", "127.0.0.1") is None
    assert policy.check("cr_room7", "CASEMASK", "127.0.0.1") == (
        REJECT_CALLING_AE, "calling AE title 'cr_room7' is not in [[sources]] ([[sources]] has 'CR_ROOM7': AE titles are case-sensitive)")
    assert policy.check("CT_ROOM9", "CASEMASK", "127.0.0.1") == (REJECT_CALLING_AE, "calling AE title 'CT_ROOM9' is not in [[sources]]")
    assert policy.check("CR_ROOM7", "CASEMASK", "10.9.8.7") == (
        REJECT_CALLING_AE, "calling AE title 'CR_ROOM7' is not allowed from 10.9.8.7 ([[sources]] host: 127.0.0.1)")


def test_a_fixed_dicomweb_password_file_is_read_again_after_a_refusal(tmp_path):
    """An admin whose STOW-RS was refused (401: check auth) fixed auth's secret_file and
    ran `casemask retry`: refused again, with the old password, until the node was
    restarted (the sender read the file once). Now a 401 or 403 makes the next batch read
    it again."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pydicom import dcmread

    from node.config import parse
    from node.scu import DicomWebSender, Work
    from tests.conftest import make_study

    seen: list[str] = []

    class Archive(BaseHTTPRequestHandler):  # refuses every upload, noting the password it was given
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(base64.b64decode(self.headers.get("Authorization", "Basic ").split()[1]).decode().split(":", 1)[1])
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        secret = tmp_path / "stow.pw"
        secret.write_text("wrong-one\n")
        raw = node_config(tmp_path, [{"name": "web", "kind": "dicomweb", "url": f"http://127.0.0.1:{server.server_port}/dicom-web",
                                      "auth": {"kind": "basic", "username": "casemask", "secret_file": str(secret)}}])
        sender = DicomWebSender(parse(raw, "test", base_dir=tmp_path).destinations[0])
        files = make_study(tmp_path / "s", 2)
        work = [Work(i, f, str(dcmread(f).SOPClassUID), "1.2.840.10008.1.2.1") for i, f in enumerate(files)]
        outcomes: list = []
        sender.send(work, lambda w, o: outcomes.append(o))
        assert seen == ["wrong-one", "wrong-one"], seen  # the whole batch with the password it started with
        assert [o.reason for o in outcomes] == ["STOW-RS answered HTTP 401: credentials refused: check auth"] * 2, outcomes
        secret.write_text("the-right-one\n")
        sender.send(work[:1], lambda w, o: outcomes.append(o))
        assert seen[-1] == "the-right-one", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_peer_that_rejects_the_node_is_one_line_of_the_nodes_not_three_of_pynetdicoms(archive_factory, caplog):
    """A dicom destination with a wrong AE title: each delivery attempt and each 30 s
    health check wrote pynetdicom's three ERROR lines ("Association Rejected", "Result:
    ...", "Reason: ...") beside the node's own line that says the same for the named
    destination. Now only the node's words, which keep the result and the reason."""
    from node.scu import echo

    archive = archive_factory(require_calling=["SOMEONE"])
    caplog.set_level(logging.INFO)
    why: list[str] = []
    assert echo("ARCHIVE", "127.0.0.1", archive.port, why=why) is None
    assert why == ["association rejected (Rejected Permanent: Calling AE title not recognised)"], why
    theirs = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    assert not theirs, theirs


def test_the_destinations_page_says_why_objects_wait_and_when_the_next_attempt_is(tmp_path):
    """The dashboard's Destinations page showed `RETRY_WAIT 1` and the health, but not the
    delivery's reason nor when the node tries again, which `casemask status` says. Now
    both pages say the same (API: not_sent, next_attempt_at)."""
    from pydicom import dcmread

    from node import accounts
    from tests.conftest import make_study, receive, wait_until
    from tests.httpnode import start_http_node

    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
                      stable_after_s=0, retry_base_s=300, retry_max_s=600)
    hn = start_http_node(raw, tmp_path)
    try:
        receive(hn.node, dcmread(make_study(tmp_path / "s", 1)[0]))
        api = hn.client("viewer")

        def waiting() -> dict | None:
            row = next(d for d in api.get("/api/v1/destinations").json() if d["name"] == "pacs")
            return row if row["deliveries"].get("RETRY_WAIT") else None

        row = wait_until(waiting, timeout=90, what="the delivery waiting for its next attempt")
        assert row["not_sent"].startswith("RETRY_WAIT: cannot connect to PACS@127.0.0.1:") and row["next_attempt_at"], row
        with hn.node.sessions() as s:
            accounts.add_user(s, "alice", "viewer", "a long passphrase")
            s.commit()
        with hn.client() as browser:
            token = re.search(r'name="login_token" value="([^"]+)"', browser.get("/login").text).group(1)
            assert browser.post("/login", data={"name": "alice", "password": "a long passphrase", "login_token": token}).status_code == 303
            page = browser.get("/destinations").text
        assert "last RETRY_WAIT: cannot connect to PACS@127.0.0.1:" in page and "; next attempt " in page, page
    finally:
        hn.node.stop()


def test_a_password_in_a_dicomweb_url_is_never_in_a_delivery_reason(tmp_path):
    """A dicomweb url with user:password@ (allowed for https://) went whole into the
    reason of a delivery that could not reach it: `cannot reach https://archiver:<the
    password>@.../studies`, which the log, `casemask status`, /api/v1/status and the
    Destinations page show to every viewer. Now its password is `***` there, as on the
    configuration page."""
    from pydicom import dcmread

    from node.config import parse
    from node.scu import DicomWebSender, Work
    from tests.conftest import make_study

    password = "Xq7-never-said-9z"
    raw = node_config(tmp_path, [{"name": "web", "kind": "dicomweb", "url": f"https://archiver:{password}@127.0.0.1:{free_port()}/dicom-web"}])
    sender = DicomWebSender(parse(raw, "test", base_dir=tmp_path).destinations[0])
    f = make_study(tmp_path / "s", 1)[0]
    outcomes: list = []
    sender.send([Work(1, f, str(dcmread(f).SOPClassUID), "1.2.840.10008.1.2.1")], lambda w, o: outcomes.append(o))
    (outcome,) = outcomes
    assert outcome.kind == "retry" and outcome.reason.startswith("cannot reach https://archiver:***@127.0.0.1:"), outcome
    assert password not in outcome.reason


def test_every_command_says_what_it_does_in_its_own_help():
    """`casemask serve --help` and `casemask status --help` printed only their usage and
    options: what the command does, how to stop or reload a node and which config it
    reads were in the README only. Now every command's help starts with a description,
    serve's says how to stop and reload it, and the top-level help names --config, the
    exit statuses and `config check`."""
    missing = [cmd for cmd, parser in _parsers(build_parser()) if not (parser.description or "").strip()]
    assert not missing, missing
    serve = dict(_parsers(build_parser()))["casemask serve"].format_help()
    for needed in ("kill -HUP", "Ctrl-C", "config check"):
        assert needed in serve, needed
    top = build_parser().format_help()
    for needed in ("--config FILE", "config/casemask.toml", "Exit status", "config check"):
        assert needed in top, needed


def test_export_mapping_says_1_row_not_1_rows(tmp_path):
    """`export-mapping` printed 'patients.csv: 1 rows' for one synthetic patient."""
    from node.config import load
    from node.mapping import save
    from node.service import Service

    cfg = write_toml(node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path / "n.toml")
    run = lambda *a: subprocess.run([sys.executable, "-m", "node.cli", *a, "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)  # noqa: E731
    assert run("db", "upgrade").returncode == 0
    with Service.open(load(cfg)).sessions() as session:
        save(session, [{"kind": "patient", "old": '["", "SYN0001"]', "new": "CMSYNTH0001"}])
        session.commit()
    r = run("export-mapping", "--out", str(tmp_path / "mapping"))
    assert r.returncode == 0, r.stderr
    assert "patients.csv: 1 row\n" in r.stdout and "uids.csv: 0 rows\n" in r.stdout, r.stdout


def test_export_mapping_writes_no_spreadsheet_formula_from_a_sender(tmp_path):
    """A Patient ID or Patient's Name that a spreadsheet would run as a formula (synthetic:
    '=HYPERLINK(...)', '@SUM(1)', '+1+2', "'quoted") is written with a single quote in
    front; whole numbers (a date offset, -12) and ordinary values are written as they are; dropping one
    leading quote gives every value back."""
    import csv

    from node.config import load
    from node.mapping import save
    from node.service import Service

    cfg = write_toml(node_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}]), tmp_path / "n.toml")
    run = lambda *a: subprocess.run([sys.executable, "-m", "node.cli", *a, "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)  # noqa: E731
    assert run("db", "upgrade").returncode == 0
    ids = ['=HYPERLINK("http://198.51.100.7/x","open")', "@SUM(1)", "+1+2", "'quoted", "SYN-0002", "-77"]
    with Service.open(load(cfg)).sessions() as session:
        for k, pid in enumerate(ids):
            who = json.dumps(["", pid])
            save(session, [{"kind": "patient", "old": who, "new": f"CMSYNTH{k}"}, {"kind": "date-offset", "old": who, "new": "-12"},
                           {"kind": "patient-name", "old": json.dumps(["", pid, "=1+1" if k == 0 else "Synthetic^Patient"]), "new": f"ANON^{k}"}])
        session.commit()
    r = run("export-mapping", "--out", str(tmp_path / "mapping"))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "mapping" / "patients.csv").open(newline="")))
    written = {row["patient_id_new"]: row for row in rows}
    assert written["CMSYNTH0"]["patient_id"] == "'" + ids[0] and written["CMSYNTH0"]["patient_name"] == "'=1+1"
    assert written["CMSYNTH1"]["patient_id"] == "'@SUM(1)" and written["CMSYNTH2"]["patient_id"] == "'+1+2"
    assert written["CMSYNTH3"]["patient_id"] == "''quoted" and written["CMSYNTH4"]["patient_id"] == "SYN-0002"
    assert written["CMSYNTH5"]["patient_id"] == "-77", "a whole number is no formula"
    assert {row["date_offset_days"] for row in rows} == {"-12"} and written["CMSYNTH4"]["patient_name"] == "Synthetic^Patient"
    assert {k: v.removeprefix("'") if v.startswith("'") else v for k, v in ((row["patient_id_new"], row["patient_id"]) for row in rows)} == {f"CMSYNTH{k}": pid for k, pid in enumerate(ids)}


def test_health_checks_a_destination_added_by_a_reload_at_once_and_forgets_a_removed_one(tmp_path, monkeypatch):
    """A folder destination added to a site file and reloaded (kill -HUP) showed `health:
    not tried yet` in `casemask status` until the next 30 s check; and one removed by a
    reload kept its old result, which made every scheduler tick (not every 30 s) check
    every destination again. A reload that adds one checks at once; one that removes one
    drops its result and checks at the usual interval."""
    from node import health
    from node.config import parse

    clock = [1000.0]
    monkeypatch.setattr(health, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    probed: list[str] = []
    real_probe = health.probe
    monkeypatch.setattr(health, "probe", lambda dest, *a, **kw: probed.append(dest.name) or real_probe(dest, *a, **kw))

    def settings(*names: str):
        return parse(node_config(tmp_path, [{"name": n, "kind": "folder", "path": str(tmp_path / n)} for n in names]), "test", base_dir=tmp_path)

    monitor = health.HealthMonitor(settings("archive", "old"))
    monitor.check_due()
    assert sorted(probed) == ["archive", "old"], probed
    clock[0] += 1
    monitor.check_due()
    assert len(probed) == 2, probed  # not due yet
    monitor.settings = settings("archive", "new")  # what a reload does
    clock[0] += 1
    monitor.check_due()
    assert sorted(probed[2:]) == ["archive", "new"] and monitor.get("new").reachable, probed
    assert monitor.get("old") is None
    for _ in range(5):  # five scheduler ticks within the interval: no check
        clock[0] += 1
        monitor.check_due()
    assert len(probed) == 4, probed
    clock[0] += monitor.interval_s
    monitor.check_due()
    assert len(probed) == 6, probed
    monitor.settings = settings("archive", "new", "third")  # a reload that only adds one
    clock[0] += 1
    monitor.check_due()
    assert sorted(probed[6:]) == ["archive", "new", "third"], probed


def test_a_command_that_needs_pytorch_says_how_to_install_it(tmp_path):
    """`make serve` installs the node without PyTorch; `casemask engine train` there ended
    in a traceback (ModuleNotFoundError: No module named 'torch'). It says what to install
    instead, exit 1."""
    code = ("import sys; sys.modules['torch'] = None\n"  # the node-only virtualenv: no PyTorch
            "from node.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "engine", "train", "--out", str(tmp_path / "bundle")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "'torch'" in r.stderr and "make venv" in r.stderr and "casemask[train]" in r.stderr, r.stderr

"""Configuration validation and the CLI's offline commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.config import ConfigError, load, parse
from tests.conftest import PYDICOM_FILES, ROOT, free_port, make_study, node_config, write_toml


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_builtin_config_is_valid():
    s = load()
    assert s.node.ae_title == "CASEMASK" and s.node.port == 11112
    assert [d.kind for d in s.destinations] == ["folder"]
    assert str(s.destinations[0].path).endswith("var/archive")


def test_problems_are_all_reported_with_what_to_fix(tmp_path):
    raw = {
        "node": {"ae_title": "WAY-TOO-LONG-AE-TITLE", "port": 70000, "unrouted": "drop"},
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "", "port": 104}, {"name": "f", "kind": "folder"}],
        "routes": [{"name": "r", "match": {"Modalty": "CT", "StudyDescription": {"regex": "("}}, "destinations": ["nowhere"], "pixels": "maybe"}],
    }
    with pytest.raises(ConfigError) as exc:
        parse(raw, "bad.toml")
    text = str(exc.value)
    for expected in ("ae_title", "1 to 65535", "hold", "AE title", "path", "'Modalty' is not a DICOM keyword", "bad regular expression", "'nowhere' is not defined", "pixels"):
        assert expected in text, expected


def test_config_check_command(tmp_path):
    good = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}]), tmp_path / "good.toml")
    r = run_cli("config", "check", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    r = run_cli("config", "check", "--config", str(good))  # as serve, status, deid... take it
    assert r.returncode == 0 and str(good) in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = "eleven"\n')
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2 and "a TCP port is an integer" in r.stderr
    r = run_cli("config", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_routes_explain_says_which_routes_match_and_why(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"] = [
        {"name": "ct", "match": {"Modality": ["CT", "MR"]}, "destinations": ["f"]},
        {"name": "chest", "match": {"BodyPartExamined": {"regex": "(?i)chest"}}, "destinations": ["f"]},
    ]
    cfg = write_toml(raw, tmp_path / "c.toml")
    r = run_cli("routes", "explain", "--config", str(cfg), str(PYDICOM_FILES / "CT_small.dcm"))
    assert r.returncode == 0
    assert "routes ct" in r.stdout
    assert "MATCH ct: Modality CT is one of ['CT', 'MR']" in r.stdout
    assert "no    chest" in r.stdout and "does not match" in r.stdout


def test_status_json_and_retry_on_an_empty_node(tmp_path):
    cfg = write_toml(node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}]), tmp_path / "c.toml")
    assert run_cli("db", "upgrade", "--config", str(cfg)).returncode == 0  # as a node's first start would (status refuses to make a database)
    r = run_cli("status", "--config", str(cfg), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["node"] == "CASEMASK"
    r = run_cli("retry", "--config", str(cfg))
    assert r.returncode == 0 and "re-queued 0" in r.stdout


def test_send_and_echo_report_an_unreachable_peer(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    r = run_cli("echo", f"NOBODY@127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and "no association (cannot connect: Connection refused)" in r.stderr, r.stderr
    # one line of its own, with the cause, not pynetdicom's two ERROR records about the same refusal
    assert "pynetdicom" not in r.stderr and "ERROR" not in r.stderr, r.stderr
    r = run_cli("send", str(make_study(tmp_path / "s", 1)[0]), "--to", f"NOBODY@127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and "not sent" in r.stdout and "cannot connect to NOBODY@127.0.0.1" in r.stderr and "Connection refused" in r.stderr, r.stderr
    assert "pynetdicom" not in r.stderr, r.stderr
    r = run_cli("-v", "echo", f"NOBODY@127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and "pynetdicom" not in r.stderr, r.stderr  # -v: more of the node's logging, still one line for this
    r = run_cli("-vv", "echo", f"NOBODY@127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and "TCP Initialisation Error" in r.stderr  # -vv shows pynetdicom's own
    r = run_cli("send", "x.dcm", "--to", "bad-peer")
    assert r.returncode == 2 and "AE_TITLE@HOST:PORT" in r.stderr


def test_every_command_has_help():
    for cmd in (["serve"], ["echo"], ["send"], ["status"], ["routes", "explain"], ["retry"], ["config", "check"], ["deid"], ["export-mapping"], ["demo"], ["engine", "train"], ["engine", "evaluate"], ["engine", "export"], ["engine", "build"], ["engine", "synth"], ["engine", "fit-gates"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, cmd


def test_every_argument_of_the_node_commands_says_what_it_takes():
    """`casemask echo --help` listed --calling-ae and --timeout with no word on them. The
    walk reads argparse's parser tree (it has no public API for that); the engine's
    research commands are left to their own lane."""
    import argparse

    from node.cli import build_parser

    def bare(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    if (*path, name) != ("engine",):
                        yield from bare(child, (*path, name))
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                yield " ".join(path), action.option_strings or action.dest

    assert list(bare(build_parser(), ())) == []


def test_types_are_checked_strictly_and_unsafe_routes_refused():
    raw = {
        "node": {"stable_after_s": "30", "accept_unknown_sources": "yes", "max_attempts": 0},
        "destinations": [{"name": "f", "kind": "folder", "path": "out"}],
        "routes": [
            {"name": "p", "pixels": "anonymize", "deid": "none", "destinations": ["f"]},
            {"name": "d", "deid": {"options": ["retain-everything"], "date_shift_days": [5, 1]}, "destinations": ["f"]},
        ],
    }
    with pytest.raises(ConfigError) as exc:
        parse(raw, "t.toml")
    text = str(exc.value)
    for expected in (
        "stable_after_s = '30': seconds",
        "accept_unknown_sources = 'yes': true or false",
        "max_attempts = 0: an integer, 1 or more",
        "'p': pixels = \"anonymize\" needs a header profile",
        "unknown option(s) 'retain-everything'",
        "the first must not exceed the second",
    ):
        assert expected in text, expected


def test_a_regex_with_an_empty_alternative_is_warned_about(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"] = [{"name": "mr", "match": {"StudyDescription": {"regex": "(?i)brain|head|"}}, "destinations": ["f"]}]
    assert any("matches every object" in w for w in parse(raw).warnings)
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 0 and "warning:" in r.stderr and "empty alternative" in r.stderr
    raw["routes"][0]["match"] = {"StudyDescription": {"regex": "(?i)brain|head"}}
    assert parse(raw).warnings == []


def test_a_demonstration_bundle_needs_the_route_to_allow_it(tmp_path):
    """The built-in model is a demonstration: a route that anonymizes pixels with it is
    refused (exit 2, a message saying what to write) unless it allows it explicitly."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"][0].update(pixels="anonymize", model="reference")
    r = run_cli("serve", "--config", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 2
    assert "is a demonstration" in r.stderr and "allow_demonstration_model = true" in r.stderr
    raw["routes"][0]["allow_demonstration_model"] = True
    assert parse(raw).routes[0].allow_demonstration_model
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 0, r.stderr


def test_the_built_in_config_anonymizes_headers_only_and_the_demo_config_turns_pixels_on():
    from node.config import load
    from node.resources import config_file

    builtin = load()
    assert all(r.pixels == "none" for r in builtin.routes)
    demo = load(config_file("demo.toml"))
    chest = demo.route("chest")
    assert chest.pixels == "anonymize" and chest.allow_demonstration_model


def test_output_size_original_is_refused_with_its_new_name(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"][0].update(pixels="anonymize", allow_demonstration_model=True, output_size="original")
    with pytest.raises(ConfigError, match="renamed 'upsampled'"):
        parse(raw)
    raw["routes"][0]["output_size"] = "upsampled"
    assert parse(raw).routes[0].output_size == "upsampled"


def test_status_says_which_bundle_each_route_uses_and_its_intended_use(tmp_path):
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"] = [
        {"name": "chest", "pixels": "anonymize", "allow_demonstration_model": True, "deid": {"profile": "basic"}, "destinations": ["f"]},
        {"name": "other", "destinations": ["f"]},
    ]
    assert run_cli("db", "upgrade", "--config", str(write_toml(raw, tmp_path / "c.toml"))).returncode == 0
    r = run_cli("status", "--config", str(tmp_path / "c.toml"))
    assert r.returncode == 0, r.stderr
    assert "route chest: pixels anonymized by model reference = bundle reference" in r.stdout
    assert "intended use: demonstration" in r.stdout and "route other: headers only" in r.stdout
    r = run_cli("status", "--json", "--config", str(tmp_path / "c.toml"))
    routes = {e["route"]: e for e in json.loads(r.stdout)["routes"]}
    assert routes["chest"]["intended_use"]["kind"] == "demonstration" and routes["chest"]["training_data"]["kind"] == "synthetic"


def test_a_host_that_cannot_be_bound_or_reached_is_a_problem_with_what_to_write(tmp_path):
    """A port or scheme in a host, or dotted digits that are no address, used to pass the
    check and stop `casemask serve` with a socket traceback."""
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "http://pacs", "port": 104}])
    raw["node"]["host"] = "localhost:11112"
    raw["sources"] = [{"ae_title": "MODALITY1", "host": "10.0.0.300"}]
    raw["http"] = {"host": "not a host"}
    raw["audit"] = {"syslog_host": "syslog:514"}
    with pytest.raises(ConfigError) as exc:
        parse(raw, "bad.toml")
    text = str(exc.value)
    for where in ("[node] host = 'localhost:11112'", "host = '10.0.0.300'", "host = 'http://pacs'", "[http] host = 'not a host'", "[audit] syslog_host = 'syslog:514'"):
        assert f"{where}: a host name or IP address, without port or scheme" in text, where
    raw["node"]["host"], raw["sources"][0]["host"], raw["http"]["host"] = "", "fe80::1", "casemask-1.example.org"
    raw["destinations"][0]["host"], raw["audit"]["syslog_host"] = "192.0.2.7", ""
    parse(raw, "good.toml")


def test_the_shipped_configs_check_without_warnings():
    """A newcomer's first `casemask config check` on the built-in config warned that its
    catch-all route's regex matched every object."""
    from node.resources import config_file

    for path in (config_file("casemask.toml"), config_file("demo.toml")):
        assert load(path).warnings == [], path
    # In the container the dashboard listens on every interface; compose publishes it on the
    # host's loopback only, and the warnings say what to do before publishing it further
    # (tls; allowed_hosts, the names admins will use).
    assert [w[:53] for w in load(ROOT / "docker" / "casemask.toml").warnings] == [
        "[http] host = '0.0.0.0' without [http] tls: passwords", "[http] host = '0.0.0.0' without [http] allowed_hosts:"]


@pytest.mark.parametrize("taken", ["node", "http"])
def test_serve_on_a_port_in_use_says_which_and_what_to_set(tmp_path, taken):
    """A second `make serve` beside a running node ended in an OSError traceback (DICOM
    port) or a traceback and scheduler errors (HTTP port), exit 1."""
    import socket

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    port = raw[taken]["port"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = run_cli("serve", "--config", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    wanted = f"cannot listen for DICOM on 127.0.0.1:{port}" if taken == "node" else f"could not listen on 127.0.0.1:{port}"
    assert wanted in r.stderr and f"[{taken}] host and port" in r.stderr
    assert "(all) listening on" not in r.stderr  # serve says so only once the ports are bound


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("10.1.2.3", True), ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_a_dashboard_on_the_network_without_tls_is_warned_about(tmp_path, host, warned):
    """Passwords, tokens and session cookies (Secure only with [http] tls) would cross the
    network in clear: `config check` says so and what to write."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    raw["http"]["host"] = host
    warnings = [w for w in load(write_toml(raw, tmp_path / "c.toml")).warnings if w.startswith("[http]")]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "in clear" in warnings[0] and "tls" in warnings[0]


def test_credentials_in_a_plain_http_dicomweb_url_are_refused(tmp_path):
    dests = [{"name": "web", "kind": "dicomweb", "url": "http://user:pw@127.0.0.1:8042/dicom-web"}]
    with pytest.raises(ConfigError) as exc:
        load(write_toml(node_config(tmp_path, dests), tmp_path / "c.toml"))
    assert any("would travel in clear" in p and "https://" in p for p in exc.value.problems)
    assert "pw" not in str(exc.value).replace("password", "")  # the password itself is not repeated
    dests[0]["url"] = "http://127.0.0.1:8042/dicom-web"
    load(write_toml(node_config(tmp_path, dests), tmp_path / "c2.toml"))  # without credentials: fine


def test_a_config_that_can_take_or_send_nothing_is_warned_about(tmp_path):
    """An empty [[sources]] rejects every sender and no [[routes]] holds every object: both
    passed `config check` silently."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "out")}])
    assert [w for w in load(write_toml(raw, tmp_path / "a.toml")).warnings if w.startswith("no [[")] == []
    del raw["sources"], raw["routes"]
    warnings = load(write_toml(raw, tmp_path / "b.toml")).warnings
    assert any(w.startswith("no [[sources]]") for w in warnings) and any(w.startswith("no [[routes]]: every object received is held") for w in warnings), warnings


def test_keep_remove_and_replace_name_attributes_the_profile_can_act_on(tmp_path):
    """A misspelt keyword in a route's keep/remove/replace passed `config check` and then
    failed every `casemask deid` and start with a traceback; an unknown public tag in
    keep would have quarantined every object that holds it (the verifier's finding)."""
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"][0]["deid"] = {"keep": ["PatientAge", "(0019,0010)", "00181030", "PatientsAge"], "remove": ["Foo"], "replace": {"(0018,99F1)": "x"}}
    with pytest.raises(ConfigError) as exc:
        parse(raw, "c.toml", base_dir=tmp_path)
    problems = exc.value.problems
    assert len(problems) == 3, problems
    assert any("'PatientsAge' is neither a DICOM keyword" in p for p in problems)
    assert any("deid.remove" in p and "'Foo' is neither" in p for p in problems)
    assert any("'(0018,99F1)' is a public element no DICOM dictionary knows" in p for p in problems)
    raw["routes"][0]["deid"] = {"keep": ["PatientAge", "(0019,0010)", "00181030"], "remove": ["(0018,99F1)"], "replace": {"PatientName": "ANON"}}
    parse(raw, "ok.toml", base_dir=tmp_path)  # a private tag kept, an unknown public one removed: fine


def test_a_route_naming_a_destination_with_a_problem_is_not_told_it_is_undefined(tmp_path):
    """A new admin's typo in one destination's key (`timout_s`) came back as three problems:
    the typo, then every route naming that destination 'is not defined', which sent them
    looking for a missing [[destinations]] entry. Only the typo is reported; a name that
    really is missing still is."""
    raw = node_config(tmp_path, [{"name": "archive", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104, "timout_s": 3}])
    raw["models"] = [{"name": "mine", "path": "builtin:reference", "bakend": "auto"}]
    raw["routes"].append({"name": "px", "match": {"Modality": "CR"}, "deid": {"profile": "basic"}, "pixels": "anonymize",
                          "model": "mine", "allow_demonstration_model": True, "destinations": ["archive", "nowhere"]})
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    problems = [line for line in r.stderr.splitlines() if line.startswith("  - ")]
    assert any("unknown setting 'timout_s'" in p for p in problems) and any("unknown setting 'bakend'" in p for p in problems), problems
    assert [p for p in problems if "is not defined" in p] == [
        "  - [[routes]] 'px': destination 'nowhere' is not defined in [[destinations]] (defined: archive)"], problems


def test_a_missing_token_file_is_not_called_a_pem_file(tmp_path):
    dests = [{"name": "web", "kind": "dicomweb", "url": "https://archive.example.org/dicom-web",
              "auth": {"kind": "bearer", "secret_file": "stow.token"}}]
    with pytest.raises(ConfigError) as exc:
        load(write_toml(node_config(tmp_path, dests), tmp_path / "c.toml"))
    (problem,) = [p for p in exc.value.problems if "secret_file" in p]
    assert "no such file" in problem and "token" in problem and "PEM" not in problem, problem


@pytest.mark.parametrize("url,warned", [("http://archive.example.org/dicom-web", True), ("http://10.1.2.50:8042/dicom-web", True),
                                        ("http://127.0.0.1:8042/dicom-web", False), ("http://localhost:8042/dicom-web", False),
                                        ("https://archive.example.org/dicom-web", False)])
def test_plain_http_dicomweb_to_another_machine_is_warned_about(tmp_path, url, warned):
    """STOW-RS over plain HTTP to another machine passed `config check` silently: the
    outputs cross the network unencrypted to a server nobody authenticated."""
    s = load(write_toml(node_config(tmp_path, [{"name": "web", "kind": "dicomweb", "url": url}]), tmp_path / "c.toml"))
    found = [w for w in s.warnings if w.startswith("[[destinations]] 'web'")]
    assert bool(found) == warned, found
    if warned:
        assert "https://" in found[0]


def test_a_typo_is_answered_with_the_name_it_most_likely_meant(tmp_path):
    """A new admin's typos came back as `unknown setting 'stable_afer_s' (known: ` and 35
    names to read through; `[destination]`, a keyword in the wrong case (`modality`), a
    route's `explian` alike. Now each says what it most likely meant, and a password
    written into auth says where a password goes instead."""
    raw = node_config(tmp_path, [{"name": "explain", "kind": "dicom", "ae_title": "EXPLAIN", "host": "127.0.0.1", "port": 104, "paht": "x"},
                                 {"name": "web", "kind": "dicomweb", "url": "https://archive.example.org/dicom-web",
                                  "auth": {"kind": "basic", "username": "u", "password": "not-here"}}])
    raw["node"]["stable_afer_s"] = 30
    raw["routes"][0]["match"] = {"modality": "CR", "StudyDescripton": "chest"}
    raw["routes"][0]["destinations"] = ["explian"]
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "c.toml")))
    assert r.returncode == 2, r.stderr
    for expected in ("unknown setting 'stable_afer_s': did you mean 'stable_after_s'? (known: ",
                     "unknown setting 'paht': did you mean 'path'?",
                     "'modality' is not a DICOM keyword (nor calling_ae / called_ae): did you mean 'Modality'?",
                     "'StudyDescripton' is not a DICOM keyword (nor calling_ae / called_ae): did you mean 'StudyDescription'?",
                     "destination 'explian' is not defined in [[destinations]]: did you mean 'explain'? (defined: explain, web)",
                     "unknown setting 'auth.password': a password or token is never written in the configuration file; write secret_file = "):
        assert expected in r.stderr, (expected, r.stderr)
    assert "not-here" not in r.stderr  # the password itself is not repeated
    with pytest.raises(ConfigError) as exc:
        parse({**node_config(tmp_path, []), "destination": [{"name": "x"}], "Node": {}}, "c.toml", base_dir=tmp_path)
    assert "unknown table [destination]: did you mean [[destinations]]? (known: " in str(exc.value), exc.value
    assert "unknown table [Node]: did you mean [node]?" in str(exc.value), exc.value
    raw = node_config(tmp_path, [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "zzzz": 1}])
    r = run_cli("config", "check", str(write_toml(raw, tmp_path / "d.toml")))
    assert "unknown setting 'zzzz' (known: " in r.stderr, r.stderr  # nothing close: no guess


@pytest.mark.parametrize("host,refused", [("127.0.0.1", False), ("localhost", False), ("[::1]", False), ("archive.example.org", True), ("10.1.2.50", True)])
def test_auth_over_plain_http_is_taken_for_an_archive_on_this_machine_only(tmp_path, host, refused):
    """An Orthanc with accounts on the node's own machine (the usual first archive) could
    not be given its password: `auth needs an https:// url (credentials would travel in
    clear)`, though nothing travels off the machine. Loopback is taken; any other host
    still needs https://, and the refusal says where http:// is taken."""
    (tmp_path / "pw").write_text("x\n")
    dests = [{"name": "web", "kind": "dicomweb", "url": f"http://{host}:8042/dicom-web",
              "auth": {"kind": "basic", "username": "u", "secret_file": str(tmp_path / "pw")}}]
    raw = node_config(tmp_path, dests)
    if not refused:
        assert load(write_toml(raw, tmp_path / "c.toml")).destinations[0].auth is not None
        return
    with pytest.raises(ConfigError) as exc:
        load(write_toml(raw, tmp_path / "c.toml"))
    assert any("auth needs an https:// url" in p and "127.0.0.1, ::1, localhost" in p for p in exc.value.problems), exc.value.problems


def test_routes_explain_says_when_the_burned_in_policy_will_quarantine_the_object(tmp_path):
    """`routes explain` said `routes headers` for an ultrasound image with
    BurnedInAnnotation YES; the node then quarantined it at the header step, which
    explain had not said. Now a matched route whose burned-in policy takes the object out
    has a NOTE saying so and what would clean it (files and uploaded bytes alike)."""
    from pydicom import dcmread

    from node.service import Service

    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": "out"}])
    raw["routes"] = [{"name": "headers", "match": {"Modality": {"regex": "."}}, "deid": {"profile": "basic"}, "destinations": ["f"]},
                     {"name": "allowed", "match": {"Modality": "CT"}, "deid": {"profile": "basic", "burned_in": "allow"}, "destinations": ["f"]}]
    cfg = write_toml(raw, tmp_path / "c.toml")
    ds = dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    r = run_cli("routes", "explain", "--config", str(cfg), str(tmp_path / "burned.dcm"), str(PYDICOM_FILES / "CT_small.dcm"))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if "NOTE" in line]
    assert notes == ['  NOTE  headers: BurnedInAnnotation is YES: quarantined by this route\'s deid burned_in = "quarantine" ("clean" masks the text: docs/burned-in.md)'], r.stdout
    explained = Service(load(cfg), sessions=None).explain((tmp_path / "burned.dcm").read_bytes())  # as /api/v1/routes/explain
    assert list(explained["burned_in"]) == ["headers"] and explained["routes"] == ["headers", "allowed"], explained


def test_a_quoted_number_a_foreign_key_name_and_an_unquoted_text_say_what_to_write(tmp_path):
    """A first site file had `port = "14242"` (quoted, as in many other tools' configs),
    `type = "folder"` (dcmtk's and Orthanc's word for `kind`) and `ae_title = CASEMASK`
    (no quotes). `config check` said only that a port is an integer, listed the known
    keys without naming `kind`, and for the TOML error gave a line and column. Now each
    message says what to write instead."""
    cfg = tmp_path / "site.toml"
    cfg.write_text('[node]\nport = "11112"\n[[destinations]]\nname = "a"\ntype = "folder"\npath = "out"\n'
                   '[[destinations]]\nname = "b"\naet = "ARCHIVE"\n[http]\nenabled = "false"\n')
    r = run_cli("config", "check", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "port = '11112': a TCP port is an integer" in r.stderr and "write it without quotes: port = 11112" in r.stderr, r.stderr
    assert "unknown setting 'type': did you mean 'kind'?" in r.stderr, r.stderr
    assert "unknown setting 'aet': did you mean 'ae_title'?" in r.stderr, r.stderr
    assert "write it without quotes: enabled = false" in r.stderr, r.stderr
    cfg.write_text('[node]\nae_title = CASEMASK\n')
    r = run_cli("config", "check", str(cfg))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and 'ae_title = "CASEMASK"' in r.stderr, r.stderr
    cfg.write_text('[node]\nport = "eleven"\n')  # a word is no number: no advice to unquote it
    r = run_cli("config", "check", str(cfg))
    assert r.returncode == 2 and "a TCP port is an integer" in r.stderr and "without quotes" not in r.stderr, r.stderr
    assert "1 problem:" in r.stderr and "problem(s)" not in r.stderr, r.stderr


def test_config_check_destinations_tries_each_destination_as_the_node_would(tmp_path, archive_factory):
    """A first site file named an archive on the wrong port: `config check` said OK, the
    node started, and the admin learnt of it from a study waiting in RETRY_WAIT (the CLI's
    `status` shows no health for a destination without a delivery). `config check
    --destinations` now tries each one before the node starts: C-ECHO calling as the
    node's AE title (an archive that knows only that title answers), a writable folder;
    exit 1 naming the one not reachable and why."""
    archive = archive_factory(require_calling=["SITENODE"])
    dests = [{"name": "pacs", "kind": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port},
             {"name": "f", "kind": "folder", "path": str(tmp_path / "out")}]
    raw = node_config(tmp_path, dests, ae_title="SITENODE")
    good = write_toml(raw, tmp_path / "good.toml")
    r = run_cli("config", "check", "--destinations", str(good))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pacs (dicom, ARCHIVE@127.0.0.1:%d as SITENODE): reachable: C-ECHO answered Success" % archive.port in r.stdout, r.stdout
    assert "f (folder, " in r.stdout and "reachable: writable" in r.stdout, r.stdout
    assert "destinations:" not in run_cli("config", "check", str(good)).stdout  # only on request: no network without it
    raw["destinations"].append({"name": "gone", "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()})
    raw["routes"][0]["destinations"] = ["pacs", "f", "gone"]
    bad = write_toml(raw, tmp_path / "bad.toml")
    r = run_cli("config", "check", "--destinations", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "gone (dicom, NOBODY@127.0.0.1:" in r.stdout and "NOT REACHABLE: no association (cannot connect" in r.stdout, r.stdout
    assert "1 destination not reachable" in r.stderr, r.stderr

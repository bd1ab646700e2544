"""Typed, validated settings loaded once from TOML at the entry point and passed down.

``load(path)`` reads a file; ``load(None)`` reads the built-in ``config/casemask.toml``.
The settings are pydantic v2 models: each key has a type (checked strictly: a port
written as a string is an error, not a guess) and a ``hint`` saying what to write.
Every problem in a file is collected and raised together in :class:`ConfigError`, one
line each, naming the table, the key, the value found and what to put there instead.
Checks that span tables (a route naming an undefined destination, say) run after each
table validated on its own.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from node.resources import config_file

DEFAULT_CONFIG = config_file("casemask.toml")

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 chars, no backslash or control
ROUTE_SPECIAL_KEYS = ("calling_ae", "called_ae")

Seconds = float  # TOML integers are accepted for seconds (strict floats take ints)


# The password of a URL's user information (RFC 3986 3.2.1): ``scheme://user:password@``.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:'\"]*):[^\s/?#'\"]*@")


def hide_credentials(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (the user name
    stays): what a viewer or operator is shown of the configuration, e.g. a
    ``database_url = "postgresql+psycopg://user:password@host/db"``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice a mistyped ``word`` most likely meant: the same but for case, else the
    closest spelling (difflib, ratio 0.7 or more: 'paht' is 'path'), else None."""
    choices = list(choices)
    same = [c for c in choices if c.lower() == word.lower()]
    if same:
        return same[0]
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return near[0] if near else None


def did_you_mean(word: str, choices: Iterable[str], show: str = "'{}'") -> str:
    """': did you mean X?' for :func:`closest`'s answer (``show`` formats it), else ''."""
    c = closest(word, choices)
    return f": did you mean {show.format(c)}?" if c is not None else ""


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'' if len(problems) == 1 else 's'}:\n" + "\n".join(f"  - {p}" for p in problems))


def hint(text: str, default: Any = ..., **kw: Any) -> Any:
    """A field whose validation errors say ``text`` (what to write there)."""
    if "default_factory" in kw:
        return Field(json_schema_extra={"hint": text}, **kw)
    return Field(default, json_schema_extra={"hint": text}, **kw)


class _Table(BaseModel):
    """A TOML table: unknown keys are errors, types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False, arbitrary_types_allowed=True)


def valid_ae_title(value: Any) -> bool:
    return isinstance(value, str) and bool(_AE_RE.match(value)) and value.strip() != ""


_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
HOST_HINT = "a host name or IP address, without port or scheme, e.g. \"127.0.0.1\" or \"pacs.example.org\""


def valid_host(value: str) -> bool:
    """True for an IPv4 or IPv6 address, or a host name (RFC 1123: dot-separated labels of
    letters, digits and '-', 253 characters at most). Dotted digits must be an address:
    "10.0.0.300" is refused rather than looked up as a name."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if not value or len(value) > 253 or labels[-1].isdigit():
        return False
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _host(cls: type, v: str | None) -> str | None:
    """A field validator shared by the tables with a host to listen on or connect to."""
    if v is not None and not valid_host(v):
        raise ValueError(HOST_HINT)
    return v


def _host_or_empty(cls: type, v: str) -> str:
    """As :func:`_host`, where empty has a meaning (all interfaces; no syslog)."""
    return v if v == "" else _host(cls, v)


class NodeTLS(_Table):
    """The DICOM TLS listener ([node.tls]); beside the plain one unless [node] port = 0."""

    port: StrictInt = hint("a TCP port is an integer from 1 to 65535, e.g. 2762", 2762, ge=1, le=65535)
    certificate: Path = hint("the node's certificate (PEM), e.g. \"tls/node.crt\"", strict=False)
    private_key: Path = hint("the certificate's private key (PEM), e.g. \"tls/node.key\"", strict=False)
    ca_certificates: Path | None = hint("CA certificates (PEM) that client certificates must chain to", None, strict=False)
    require_client_certificate: StrictBool = hint("true or false", True)


class NodeSettings(_Table):
    ae_title: str = hint("an AE title is 1 to 16 characters, no backslash", "CASEMASK")
    host: str = hint("an address to listen on, e.g. \"0.0.0.0\" or \"127.0.0.1\"", "0.0.0.0")
    port: StrictInt = hint("a TCP port is an integer from 1 to 65535 (0: no plain listener, [node.tls] only)", 11112, ge=0, le=65535)
    data_dir: Path = hint("a folder for the spool, outbox, database and secret, e.g. \"var\"", Path("var"), strict=False)
    database_url: str = hint("empty for SQLite under data_dir, or a PostgreSQL URL, e.g. \"postgresql+psycopg://casemask@db-host/casemask\"", "")
    # Connections this process may hold (docs/cluster.md, "Connection budget"); 0: as many as its role needs.
    db_pool_size: StrictInt = hint("an integer, 0 or more (0: sized for the role: max_associations + 4 for ingest, destinations + 5 for a worker, both for all; docs/cluster.md)", 0, ge=0)
    db_max_overflow: StrictInt = hint("an integer, 0 or more (connections beyond db_pool_size for bursts)", 4, ge=0)
    db_pool_timeout_s: Seconds = hint("seconds, more than 0 (how long a thread waits for a free connection)", 30.0, gt=0)
    secret_path: Path | None = hint("a file holding the pseudonym secret (hex)", None, strict=False)
    secret_env: str = hint("the name of an environment variable holding the pseudonym secret (hex), e.g. \"CASEMASK_SECRET\"", "")
    node_id: str = hint("this node's name among nodes sharing a database: letters, digits, '.', '_', '-' (1 to 40); empty: made once and kept in data_dir/node-id", "")
    max_job_attempts: StrictInt = hint("an integer, 1 or more (tries of one object through a route before it is quarantined)", 3, ge=1)
    stable_after_s: Seconds = hint("seconds, 0 or more", 30.0, ge=0)
    max_study_wait_s: Seconds = hint("seconds, 0 or more (how long a study's oldest object waits at most for the study to become stable; "
                                     "then what arrived is routed and later objects follow as an amendment; 0: no limit)", 3600.0, ge=0)
    accept_unknown_sources: StrictBool = hint("true or false", False)
    unrouted: Literal["hold", "discard"] = hint("choose one of 'hold', 'discard'", "hold")
    lease_s: Seconds = hint("seconds, more than 0", 300.0, gt=0)
    poll_interval_s: Seconds = hint("seconds, more than 0", 1.0, gt=0)
    retry_base_s: Seconds = hint("seconds, more than 0", 5.0, gt=0)
    retry_max_s: Seconds = hint("seconds, more than 0", 600.0, gt=0)
    max_attempts: StrictInt = hint("an integer, 1 or more", 20, ge=1)
    acse_timeout_s: Seconds = hint("seconds, more than 0", 30.0, gt=0)
    dimse_timeout_s: Seconds = hint("seconds, more than 0", 60.0, gt=0)
    network_timeout_s: Seconds = hint("seconds, more than 0", 60.0, gt=0)
    reactor_delay_s: Seconds = hint("seconds, 0 or more (the reactor's poll interval)", 0.00005, ge=0)
    reactor_max_wait_ms: StrictInt = hint("milliseconds, an integer 0 to 1000 (0: accepted associations poll every reactor_delay_s, as pynetdicom does)", 50, ge=0, le=1000)
    burned_in_regions: Path | None = hint("a TOML file of region rules (default: config/burned_in_regions.toml)", None, strict=False)
    burned_in_lanes: StrictInt = hint("an integer, 1 or more (objects the burned-in step cleans at once, each lane with its own text detectors)", 1, ge=1)
    parallel_durability: StrictBool = hint("true or false (false: fsync a received file, then link it, then fsync its folder, one after the other)", True)
    receivers: StrictInt = hint("an integer, 0 or more (processes receiving on the port; 0: the number of cores)", 0, ge=0)
    max_associations: StrictInt = hint("an integer, 1 or more", 32, ge=1)
    max_associations_per_host: StrictInt = hint("an integer, 1 or more", 8, ge=1)
    max_object_mb: StrictInt = hint("megabytes, an integer 1 or more", 4096, ge=1)
    min_free_disk_mb: StrictInt = hint("megabytes, an integer 0 or more (0: no floor)", 1024, ge=0)
    strict_uids: StrictBool = hint("true or false (false lets UID components with leading zeros in)", True)
    tls: NodeTLS | None = hint("a table: [node.tls] port, certificate, private_key, ca_certificates, require_client_certificate", None)

    _check_host = field_validator("host")(_host_or_empty)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not valid_ae_title(v):
            raise ValueError("an AE title is 1 to 16 characters, no backslash")
        return v

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v):
            raise ValueError("the name of an environment variable: letters, digits and '_', not starting with a digit, e.g. \"CASEMASK_SECRET\"")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if v and not v.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("empty for SQLite under data_dir, \"sqlite:////path/to/file.db\", or \"postgresql+psycopg://user@host/dbname\" (psycopg 3)")
        return v

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9._-]{1,40}", v):
            raise ValueError("letters, digits, '.', '_' or '-', 1 to 40 of them, e.g. \"node-a\"")
        return v

    @property
    def resolved_secret_path(self) -> Path:
        return self.secret_path or self.data_dir / "secret.key"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'casemask.db').resolve()}"


# The database refuses to delete audit entries younger than this (triggers, migration 0005).
AUDIT_MIN_DAYS = 365


class RetentionSettings(_Table):
    """How long files holding (or derived from) patient data stay in the data folder.
    Rows stay: UIDs and states for the audit trail (see node.retention)."""

    originals_days: StrictInt = hint("days; 0 deletes a received object once everything made from it is SENT, -1 keeps it", 0, ge=-1)
    outputs_days: StrictInt = hint("days; 0 deletes a de-identified file once delivered to every destination, -1 keeps it", 0, ge=-1)
    quarantine_days: StrictInt = hint("days a quarantined object is kept for review, then deleted; -1 keeps it", 30, ge=-1)
    held_days: StrictInt = hint("days an object held for a route (unrouted = \"hold\": it matched none) is kept, then deleted; -1 keeps it", 30, ge=-1)
    mapping_days: StrictInt = hint("days a pseudonym mapping row (original Patient ID, name and UIDs, for casemask export-mapping) is kept "
                                   "after it was last met; 0 stores none, -1 keeps it", 30, ge=-1)
    unconfigured_days: StrictInt = hint("days deliveries to a destination removed from the configuration are kept owed, then given up "
                                        "(their files deleted); -1 keeps them", 30, ge=-1)
    failed_days: StrictInt = hint("days an original (and its output) whose delivery is FAILED (dead letter) is kept after the last attempt, "
                                  "then deleted (audited); -1 keeps it until the delivery is re-queued and sent", -1, ge=-1)
    audit_days: StrictInt = hint("days an audit trail entry is kept (entries hold no PHI): 365 or more, or -1 to keep them for ever", 2190, ge=-1)
    interval_s: Seconds = hint("seconds between retention runs, more than 0", 300.0, gt=0)

    @field_validator("audit_days")
    @classmethod
    def _audit_days(cls, v: int) -> int:
        if 0 <= v < AUDIT_MIN_DAYS:
            raise ValueError(f"write {AUDIT_MIN_DAYS} or more days (the database refuses to delete younger entries), or -1 to keep them for ever")
        return v

    def describe(self) -> list[str]:
        """What retention does with these settings, one line per kind of data (for
        ``casemask config check``)."""

        def days(n: int, after: str) -> str:
            return "kept for ever (-1)" if n < 0 else f"deleted {n} days after {after}" if n else f"deleted once {after}"

        return [
            f"originals: {days(self.originals_days, 'every output made from them is delivered')}",
            f"de-identified outputs: {days(self.outputs_days, 'delivered to every destination')}",
            f"quarantined originals: {days(self.quarantine_days, 'they were quarantined')}",
            f"held originals (matched no route, unrouted = hold): {days(self.held_days, 'they were held')}",
            "pseudonym mapping (original Patient IDs, names, UIDs): "
            + ("not stored (mapping_days = 0): casemask export-mapping has nothing to export" if self.mapping_days == 0
               else days(self.mapping_days, "a patient's or UID's last object") + ("" if self.mapping_days < 0 else "; export it before then (casemask export-mapping)")),
            "originals and outputs whose delivery FAILED (dead letter): " + (days(self.failed_days, "the last attempt") if self.failed_days >= 0
                                                                               else "kept until re-queued and sent (-1; casemask status shows how many and the oldest)"),
            f"audit trail entries (no PHI): {days(self.audit_days, 'they were written')}",
            f"deliveries to a destination no longer configured: {days(self.unconfigured_days, 'it was removed') if self.unconfigured_days else 'given up at once'}"
            + (" (then their files are deleted like delivered ones)" if self.unconfigured_days >= 0 else ""),
        ]


class Source(_Table):
    ae_title: str = hint("an AE title is 1 to 16 characters, no backslash")
    host: str | None = hint("a host name or address the source must connect from", None)
    # The client certificate binds the AE title: over [node.tls], with a certificate
    # verified against its ca_certificates (PS3.15 B.1: the TLS peer is authenticated,
    # the AE title alone is only a claim). Without it any certificate from the CA could
    # associate under this AE title, and so could any sender on the plain port.
    certificate_cn: str | None = hint("the Common Name (CN) of the client certificate this source must present over [node.tls]", None)

    _check_host = field_validator("host")(_host)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not valid_ae_title(v):
            raise ValueError("an AE title is 1 to 16 characters")
        return v

    @field_validator("certificate_cn")
    @classmethod
    def _cn(cls, v: str | None) -> str | None:
        # "" read as no binding (the source was then open to any certificate, the plain
        # port, and anyone under accept_unknown_sources); a CN with spaces around it
        # matched no certificate and the refusal did not say why.
        if v is not None and (not v or v != v.strip()):
            raise ValueError("a certificate_cn is the certificate's Common Name exactly: not empty, no spaces around it (leave it out for no binding)")
        return v


class DestinationTLS(_Table):
    """TLS towards a destination: verify its certificate, optionally present ours."""

    ca_certificates: Path | None = hint("CA certificates (PEM) the destination's certificate must chain to (default: the system's)", None, strict=False)
    certificate: Path | None = hint("the node's client certificate (PEM)", None, strict=False)
    private_key: Path | None = hint("the client certificate's private key (PEM)", None, strict=False)


class DicomWebAuth(_Table):
    """Credentials for a dicomweb destination; the secret comes from a file or an
    environment variable, never from the configuration itself, and is never logged."""

    kind: Literal["bearer", "basic"] = hint("choose one of 'bearer', 'basic'")
    username: str = hint("the user name (basic)", "")
    secret_file: Path | None = hint("a file holding the token (bearer) or password (basic)", None, strict=False)
    secret_env: str = hint("an environment variable holding the token (bearer) or password (basic)", "")


class Destination(_Table):
    name: str = hint("a name routes refer to, e.g. \"archive\"")
    kind: Literal["dicom", "folder", "dicomweb"] = hint("choose one of 'dicom', 'folder', 'dicomweb'", "dicom")
    ae_title: str = hint("the archive's AE title (1 to 16 characters)", "")
    host: str = hint("the archive's host name or address", "127.0.0.1")
    port: StrictInt = hint("a TCP port is an integer from 1 to 65535", 104)
    path: Path | None = hint("a folder destination needs path = \"DIR\"", None, strict=False)
    url: str = hint("a dicomweb destination needs url = \"http://host:port/dicom-web\"", "")
    calling_ae: str = hint("an AE title is 1 to 16 characters", "")  # defaults to the node's AE title
    timeout_s: Seconds = hint("seconds, more than 0", 30.0, gt=0)
    tls: DestinationTLS | None = hint("a table: tls = { ca_certificates = \"...\", certificate = \"...\", private_key = \"...\" }", None)
    auth: DicomWebAuth | None = hint("a table: auth = { kind = \"bearer\", secret_file = \"...\" } or { kind = \"basic\", username = \"...\", secret_env = \"...\" }", None)

    _check_host = field_validator("host")(_host)


def _check_attribute(name: str, keep: bool) -> None:
    """A name in keep/remove/replace must be a DICOM keyword or a tag; an attribute kept
    (or replaced) must not be a public element no dictionary knows, which the verifier
    finds in every output that holds it (every such object would be quarantined).

    Raises:
        ValueError: says what to write instead.
    """
    from pydicom.datadict import dictionary_VR

    from node.deid.profile import tag_of

    try:
        tag = tag_of(name)
    except ValueError:
        raise ValueError(f"{name!r} is neither a DICOM keyword (e.g. \"PatientAge\") nor a tag (e.g. \"00101010\" or \"(0010,1010)\")") from None
    group, element = tag >> 16, tag & 0xFFFF
    if keep and not group % 2 and group not in (0x0000, 0x0002, 0xFFFE) and element:
        try:
            dictionary_VR(tag)
        except KeyError:
            raise ValueError(f"{name!r} is a public element no DICOM dictionary knows: the verifier quarantines every output that holds one "
                             "(nothing says what it carries); remove it from the list") from None


class DeidSettings(_Table):
    profile: Literal["basic"] = hint("the PS3.15 Basic Profile: profile = \"basic\"", "basic")
    options: list[str] = hint("a list of PS3.15 options, e.g. [\"retain-longitudinal-modified-dates\"]", default_factory=list)
    keep: list[str] = hint("a list of keywords or tags to keep", [])
    remove: list[str] = hint("a list of keywords or tags to remove", [])
    replace: dict[str, str] = hint("a table keyword = \"value\"", {})
    date_shift_days: tuple[StrictInt, StrictInt] = hint("two integers [low, high], e.g. [-365, -1]", (-365, -1), strict=False)
    burned_in: Literal["quarantine", "allow", "clean"] = hint("choose one of 'quarantine', 'allow', 'clean' (mask burned-in text, see docs/burned-in.md)", "quarantine")

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        from node.deid.profile import OPTIONS

        from node.deid.profile import MUTUALLY_EXCLUSIVE

        bad = [o for o in v if o not in OPTIONS]
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, bad))}: choose from {', '.join(OPTIONS)}")
        for group in MUTUALLY_EXCLUSIVE:
            if len(group & set(v)) > 1:
                raise ValueError(f"{' and '.join(sorted(group))} exclude each other (PS3.15 E.3.6): keep one")
        return v

    @field_validator("keep", "remove")
    @classmethod
    def _attributes(cls, v: list[str], info) -> list[str]:
        for name in v:
            _check_attribute(name, keep=info.field_name == "keep")
        return v

    @field_validator("replace")
    @classmethod
    def _replaced(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            _check_attribute(name, keep=True)
        return v

    @field_validator("date_shift_days")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1]:
            raise ValueError(f"[{v[0]}, {v[1]}]: the first must not exceed the second")
        return v


class Route(_Table):
    name: str = hint("a name for the route, e.g. \"chest\"")
    match: dict[str, Any] = hint("a table, e.g. match = { Modality = [\"CR\", \"DX\"] }", {})
    deid: DeidSettings | None = hint("a table, e.g. deid = { profile = \"basic\" }, or \"none\"", default_factory=DeidSettings)
    pixels: Literal["none", "anonymize"] = hint("choose one of 'none', 'anonymize'", "none")
    counterfactuals: StrictBool = hint("true or false", False)
    model: str = hint("the name of a [[models]] entry", "reference")
    output_size: Literal["model", "upsampled"] = hint("choose one of 'model' (the model's grid, e.g. 64x64), 'upsampled' (enlarged to the original's rows and columns, no finer detail)", "model")
    allow_demonstration_model: StrictBool = hint("true or false: true lets pixels = \"anonymize\" run a bundle whose intended use is demonstration", False)
    partial: Literal["quarantine-study", "skip-object"] = hint("choose one of 'quarantine-study', 'skip-object'", "quarantine-study")
    destinations: list[str] = hint("a list of destination names, e.g. [\"archive\"]", [])
    index: StrictBool = hint("true or false: true keeps the medical vector of each anonymized output for casemask similar", False)

    @field_validator("deid", mode="before")
    @classmethod
    def _no_deid(cls, v: Any) -> Any:
        return None if v is False or v == "none" else v

    @field_validator("output_size", mode="before")
    @classmethod
    def _renamed_size(cls, v: Any) -> Any:
        if v == "original":
            raise ValueError("'original' was renamed 'upsampled': it only enlarges the model's image (e.g. 64x64) to the original's rows and columns; "
                             "write output_size = \"upsampled\" for that, or \"model\" to keep the model's grid")
        return v


class ModelSettings(_Table):
    name: str = hint("a name routes refer to, e.g. \"reference\"")
    path: str = hint("a bundle folder, or builtin:reference", "builtin:reference")
    backend: Literal["auto", "tensorrt", "onnxruntime", "torch", "triton"] = hint("choose one of 'auto', 'tensorrt', 'onnxruntime', 'torch', 'triton'", "auto")
    batch_size: StrictInt = hint("an integer, 1 or more", 32, ge=1)
    # backend = "triton": a Triton Inference Server several nodes share (engine.runtime.triton)
    url: str = hint("the Triton server's gRPC address, url = \"gpu-host:8001\"", "")
    triton_model: str = hint("the served model's name as casemask engine triton-repo --name wrote it (default: this entry's name)", "")
    triton_version: StrictInt = hint("a Triton model version, 1 or more (0: the newest the server has)", 0, ge=0)
    timeout_s: Seconds = hint("seconds, more than 0", 30.0, gt=0)
    tls_ca_file: Path | None = hint("a PEM file of the CA that signed the Triton server's certificate (turns TLS on)", None, strict=False)
    tls_cert_file: Path | None = hint("a PEM client certificate for the Triton server", None, strict=False)
    tls_key_file: Path | None = hint("the PEM key of tls_cert_file", None, strict=False)

    def triton_target(self):
        """The :class:`engine.runtime.TritonTarget` of a ``backend = "triton"`` entry."""
        from engine.runtime.triton import TritonTarget

        return TritonTarget(self.url, self.triton_model or self.name, self.triton_version, self.timeout_s, self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`engine.load_model` beyond the backend."""
        return {"triton": self.triton_target()} if self.backend == "triton" else {}


def _tcp_port(cls: type, v: int) -> int:
    """A field validator shared by the tables with a port."""
    if not 1 <= v <= 65535:
        raise ValueError("a TCP port is an integer from 1 to 65535")
    return v


class HttpTls(_Table):
    certificate: Path = hint("a PEM certificate file, e.g. certificate = \"/etc/casemask/http.crt\"", strict=False)
    private_key: Path = hint("the PEM private key of that certificate, e.g. private_key = \"/etc/casemask/http.key\"", strict=False)


class HttpSettings(_Table):
    """The operator's HTTP server (API, dashboard, /metrics), started by ``casemask serve``."""

    enabled: StrictBool = hint("true or false", True)
    host: str = hint("an address to listen on, e.g. \"127.0.0.1\" (this machine only) or \"0.0.0.0\"", "127.0.0.1")
    port: StrictInt = hint("a TCP port is an integer from 1 to 65535", 8080)
    tls: HttpTls | None = hint("a table, e.g. tls = { certificate = \"http.crt\", private_key = \"http.key\" }", None)
    public_metrics: StrictBool = hint("true or false (true: /metrics answers without a token)", False)
    session_hours: Seconds = hint("hours a dashboard login lasts, more than 0", 8.0, gt=0)
    login_attempts: StrictInt = hint("failed logins allowed per name and address within login_window_s, 1 or more", 5, ge=1)
    login_window_s: Seconds = hint("seconds, more than 0", 900.0, gt=0)
    allowed_hosts: list[str] = hint("a list of the names and addresses admins reach the node by, without port, e.g. "
                                    "[\"casemask.example.org\", \"10.0.0.5\"]; \"*.example.org\" for a domain's hosts", [])

    _port = field_validator("port")(_tcp_port)
    _check_host = field_validator("host")(_host)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: list[str]) -> list[str]:
        for name in v:
            bare = name[2:] if name.startswith("*.") else name
            if not isinstance(name, str) or not valid_host(bare):
                raise ValueError("each entry a host name or IP address without port or scheme, or \"*.example.org\", "
                                 "e.g. allowed_hosts = [\"casemask.example.org\"]")
        return v

    def trusted_hosts(self) -> list[str]:
        """The Host header values the HTTP server answers (DNS rebinding defence:
        a web page whose name an attacker points at this node gets 400): ``allowed_hosts``
        when given; else this machine's loopback names when ``host`` is a loopback
        address; else any (``config check`` warns). Returned lower-case, IPv6 addresses
        also in brackets."""
        if self.allowed_hosts:
            names = list(self.allowed_hosts)
        elif _loopback(self.host):
            names = ["localhost", "127.0.0.1", "::1"]
        else:
            return ["*"]
        return sorted({n.lower() for n in names} | {f"[{n}]" for n in names if ":" in n})


class AuditSettings(_Table):
    """Where audit messages go besides the database (which always keeps them)."""

    site: str = hint("a name for this site in audit messages (AuditEnterpriseSiteID), e.g. \"Radiology\"", "")
    syslog_host: str = hint("a syslog collector's host name or address; empty: no syslog", "")
    syslog_port: StrictInt = hint("a TCP or UDP port from 1 to 65535 (514 UDP, 6514 TLS are usual)", 514)
    syslog_transport: Literal["udp", "tcp", "tls"] = hint("choose one of 'udp', 'tcp', 'tls'", "udp")
    syslog_ca: Path | None = hint("for tls: a PEM file of the CA that signed the collector's certificate", None, strict=False)

    _port = field_validator("syslog_port")(_tcp_port)
    _check_host = field_validator("syslog_host")(_host_or_empty)


# Keys an admin writes for a secret where the configuration takes secret_file / secret_env.
_SECRET_WORDS = ("password", "passwd", "token", "secret", "bearer")
# Words other tools use for a setting of ours, too far from its name for difflib to see
# (dcmtk and Orthanc say "type" or "AET"; a destination's folder is "path").
_SYNONYMS = {"type": "kind", "aet": "ae_title", "ae": "ae_title", "aetitle": "ae_title", "address": "host",
             "hostname": "host", "ip": "host", "folder": "path", "directory": "path", "dir": "path"}


def _unquote_hint(err: dict[str, Any], key: str) -> str:
    """'; write it without quotes: port = 14242' for a number or boolean written as a
    TOML string (``port = "14242"``, ``enabled = "false"``), else ''."""
    value = err.get("input")
    if not isinstance(value, str):
        return ""
    v = value.strip()
    name = key.rsplit(".", 1)[-1]
    if err["type"] == "int_type" and re.fullmatch(r"[+-]?\d+", v):
        return f"; write it without quotes: {name} = {int(v)}"
    if err["type"] in ("float_type", "int_type") and re.fullmatch(r"[+-]?\d+(\.\d*)?", v):
        return f"; write it without quotes: {name} = {v}"
    if err["type"] == "bool_type" and v.lower() in ("true", "false"):
        return f"; write it without quotes: {name} = {v.lower()}"
    return ""

# The tables written [[name]], repeated once per entry (the others are written [name]).
_ARRAYS_OF_TABLES = ("sources", "destinations", "routes", "models")


class Settings(BaseModel):
    """The whole configuration; built by :func:`parse`, never from raw TOML directly."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    node: NodeSettings = Field(default_factory=NodeSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    sources: list[Source] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    http: HttpSettings = Field(default_factory=HttpSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    source_file: Path | None = None
    warnings: list[str] = Field(default_factory=list)  # suspicious but valid settings

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)

    def model(self, name: str) -> ModelSettings:
        for m in self.models:
            if m.name == name:
                return m
        if name == "reference":
            return ModelSettings(name="reference")
        raise KeyError(name)


# -- turning pydantic's errors into what-to-write messages ---------------------------------
def _field_hint(model: type[BaseModel], loc: tuple) -> str:
    """The ``hint`` of the field an error location points at (nested tables included)."""
    cls: Any = model
    text = ""
    for part in loc:
        if not isinstance(part, str) or cls is None or not hasattr(cls, "model_fields"):
            break
        f = cls.model_fields.get(part)
        if f is None:
            break
        text = (f.json_schema_extra or {}).get("hint", "") if isinstance(f.json_schema_extra, dict) else ""
        ann = f.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return text


def _messages(exc: ValidationError, model: type[BaseModel], where: str, raw: dict[str, Any]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        keys = [p for p in loc if isinstance(p, str)]
        if err["type"] == "extra_forbidden":
            names = _known(model, loc[:-1])
            hint_ = did_you_mean(str(loc[-1]), names)
            if not hint_ and _SYNONYMS.get(str(loc[-1]).lower()) in names:
                hint_ = f": did you mean '{_SYNONYMS[str(loc[-1]).lower()]}'?"
            if "secret_file" in names and str(loc[-1]).lower() in _SECRET_WORDS:
                hint_ = (": a password or token is never written in the configuration file; "
                         "write secret_file = \"FILE\" (a file holding it, readable by the node only) or secret_env = \"NAME\" (an environment variable)")
            out.append(f"{where}: unknown setting '{'.'.join(map(str, loc))}'{hint_} (known: {', '.join(sorted(names))})")
            continue
        if err["type"] == "missing":
            out.append(f"{where}: '{'.'.join(keys)}' is required: {_field_hint(model, loc)}")
            continue
        value = err.get("input")
        custom = err["type"] == "value_error"
        why = str(err["msg"]).removeprefix("Value error, ") if custom else _field_hint(model, loc) or err["msg"]
        key = ".".join(keys[:1] + [str(p) for p in loc[1:]]) if keys else "?"
        if value is None or isinstance(value, dict) and key.split(".")[0] not in raw:
            out.append(f"{where} {key}: {why}")
        else:
            out.append(f"{where} {key} = {value!r}: {why}{_unquote_hint(err, key)}")
    return out


def _known(model: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model
    for part in loc:
        f = cls.model_fields.get(part) if isinstance(part, str) else None
        if f is None:
            break
        cls = next((a for a in getattr(f.annotation, "__args__", (f.annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)), cls)
    return list(cls.model_fields)


def _validate(model: type[_Table], raw: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table, found {type(raw).__name__}")
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_messages(exc, model, where, raw))
        return None


def _absolute(p: Path | None, base_dir: Path) -> Path | None:
    if p is None:
        return None
    p = Path(p)
    return p if p.is_absolute() else (base_dir / p).resolve()


def _absolute_sqlite(url: str, base_dir: Path) -> str:
    """A SQLite URL with a relative file (``sqlite:///casemask.db``: three slashes)
    made absolute against ``base_dir``; any other URL as it is."""
    if not url.startswith("sqlite:///"):
        return url
    file, sep, query = url.removeprefix("sqlite:///").partition("?")
    if not file or file.startswith(":memory:") or Path(file).is_absolute():
        return url
    return f"sqlite:///{(base_dir / file).resolve()}{sep}{query}"


def _entries(raw: dict[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append(f"[[{key}]]: expected an array of tables ([[{key}]] entries)")
        return []
    return value


def _names(raw: dict[str, Any], key: str) -> set[str]:
    """The ``name`` of every ``[[key]]`` entry that has a string one, valid or not."""
    value = raw.get(key, [])
    return {e["name"] for e in value if isinstance(e, dict) and isinstance(e.get("name"), str)} if isinstance(value, list) else set()


def parse(raw: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> Settings:
    """Validate a parsed TOML document and return :class:`Settings`.

    Relative paths (folders, files, a relative SQLite ``database_url``) are resolved
    against ``base_dir`` (default: the current directory; :func:`load` passes the
    configuration file's folder).

    Raises:
        ConfigError: with one line per problem found, all of them at once.
    """
    problems: list[str] = []
    warnings: list[str] = []
    base_dir = base_dir or Path.cwd()
    known = set(Settings.model_fields) - {"source_file", "warnings"}
    for key in raw:
        if key not in known:
            near = closest(key, known)
            hint_ = "" if near is None else f": did you mean [[{near}]]?" if near in _ARRAYS_OF_TABLES else f": did you mean [{near}]?"
            problems.append(f"unknown table [{key}]{hint_} (known: {', '.join(sorted(known))})")

    node = _validate(NodeSettings, raw.get("node", {}), "[node]", problems) or NodeSettings()
    node.data_dir = _absolute(node.data_dir, base_dir)  # type: ignore[assignment]
    node.secret_path = _absolute(node.secret_path, base_dir)
    node.database_url = _absolute_sqlite(node.database_url, base_dir)
    if node.secret_path and node.secret_env:
        problems.append("[node]: secret_path and secret_env both name a pseudonym secret: keep one of them")
    retention = _validate(RetentionSettings, raw.get("retention", {}), "[retention]", problems) or RetentionSettings()
    node.burned_in_regions = _absolute(node.burned_in_regions, base_dir)
    _check_listeners(node, base_dir, problems)

    sources = [s for k, e in enumerate(_entries(raw, "sources", problems)) if (s := _validate(Source, e, f"[[sources]] #{k + 1}", problems))]
    _check_source_certificates(sources, node, problems)

    destinations: list[Destination] = []
    for k, e in enumerate(_entries(raw, "destinations", problems)):
        label = f"[[destinations]] '{e.get('name')}'" if isinstance(e, dict) and e.get("name") else f"[[destinations]] #{k + 1}"
        dest = _validate(Destination, e, label, problems)
        if dest is None:
            continue
        _check_destination(dest, label, base_dir, problems)
        if any(d2.name == dest.name for d2 in destinations):
            problems.append(f"{label}: two destinations have this name")
        destinations.append(dest)

    models = [m for k, e in enumerate(_entries(raw, "models", problems)) if (m := _validate(ModelSettings, e, f"[[models]] #{k + 1}", problems))]
    for m in models:
        if not m.path.startswith("builtin:"):
            m.path = str(_absolute(Path(m.path), base_dir))  # a bundle folder
        _check_model(m, f"[[models]] '{m.name}'", base_dir, problems)
    model_names = {m.name for m in models} | {"reference"}

    routes: list[Route] = []
    # Names of every entry written, valid or not: a route naming a destination or model
    # whose own entry has a problem is not reported again as naming an undefined one.
    dest_names = {d.name for d in destinations} | _names(raw, "destinations")
    model_names |= _names(raw, "models")
    for k, e in enumerate(_entries(raw, "routes", problems)):
        label = f"[[routes]] '{e.get('name')}'" if isinstance(e, dict) and e.get("name") else f"[[routes]] #{k + 1}"
        route = _validate(Route, e, label, problems)
        if route is None:
            # Still check what can be checked, so that one run reports every problem.
            if isinstance(e, dict):
                partial = Route.model_construct(**{k: v for k, v in e.items() if k in ("name", "match", "destinations") and isinstance(v, (str, dict, list))})
                _check_route(partial, label, dest_names, model_names, problems, warnings)
            continue
        _check_route(route, label, dest_names, model_names, problems, warnings)
        if any(r2.name == route.name for r2 in routes):
            problems.append(f"{label}: two routes have this name")
        routes.append(route)

    for d in destinations:
        if d.kind == "dicomweb" and d.url.startswith("http://") and not _loopback(urlsplit(d.url).hostname or ""):
            warnings.append(f"[[destinations]] '{d.name}' url = {d.url!r}: plain HTTP to another machine; the de-identified objects "
                            "cross the network unencrypted and the server is not authenticated: write an https:// url")
    if retention.mapping_days < 0:
        warnings.append("[retention] mapping_days = -1: the pseudonym mapping (original Patient IDs and names in clear) is kept for ever; "
                        "write a number of days (the honest broker exports it before then), or 0 to store none")
    if retention.held_days < 0 and node.unrouted == "hold":
        warnings.append("[retention] held_days = -1: objects that match no route (unrouted = \"hold\") keep their originals, with the patient's data, "
                        "for ever; write a number of days (default 30), time enough to add a route for them")
    if not sources:
        warnings.append("no [[sources]]: every association is rejected; add [[sources]] ae_title = \"MODALITY\" for each sender")
    if not routes:
        warnings.append(f"no [[routes]]: every object received is {'held' if node.unrouted == 'hold' else 'discarded'} "
                        "(unrouted); add [[routes]] with deid = { profile = \"basic\" } and destinations = [\"...\"]")
    if any(r.deid is not None and r.deid.burned_in == "clean" for r in routes):
        _check_burned_in_regions(node, problems)
    _check_pixel_models(routes, models, problems)
    http = _validate(HttpSettings, raw.get("http", {}), "[http]", problems) or HttpSettings()
    if http.tls is not None:
        http.tls.certificate = _absolute(http.tls.certificate, base_dir)  # type: ignore[assignment]
        http.tls.private_key = _absolute(http.tls.private_key, base_dir)  # type: ignore[assignment]
        for key in ("certificate", "private_key"):
            if not Path(getattr(http.tls, key)).is_file():
                problems.append(f"[http] tls.{key} = {str(getattr(http.tls, key))!r}: no such file (a PEM file the node can read)")
    elif http.enabled and not _loopback(http.host):
        warnings.append(f"[http] host = {http.host!r} without [http] tls: passwords, tokens and session cookies cross the network in clear; "
                        "set [http] tls = { certificate = \"...\", private_key = \"...\" } or keep host = \"127.0.0.1\"")
    if http.enabled and not _loopback(http.host) and not http.allowed_hosts:
        warnings.append(f"[http] host = {http.host!r} without [http] allowed_hosts: the dashboard answers any host name, so a web page "
                        "whose name an attacker points at this node (DNS rebinding) can reach it; set allowed_hosts = [\"the.name.admins.use\"]")
    audit = _validate(AuditSettings, raw.get("audit", {}), "[audit]", problems) or AuditSettings()
    audit.syslog_ca = _absolute(audit.syslog_ca, base_dir)

    if problems:
        raise ConfigError(problems, source)
    return Settings(node=node, retention=retention, sources=sources, destinations=destinations, routes=routes, models=models, http=http, audit=audit, warnings=warnings)


def _check_burned_in_regions(node: NodeSettings, problems: list[str]) -> None:
    from node.burnedin.regions import RegionRules

    try:
        RegionRules.load(node.burned_in_regions)
    except ConfigError as exc:
        problems.extend(f"[node] burned_in_regions: {p}" for p in exc.problems)


def _check_file(path: Path | None, where: str, base_dir: Path, problems: list[str], what: str = "a PEM file") -> Path | None:
    """``path`` resolved against ``base_dir``; a problem naming ``what`` the file holds
    when it is not a readable file."""
    p = _absolute(path, base_dir)
    if p is not None and not p.is_file():
        resolved = f" ({p})" if str(p) != str(path) else ""
        problems.append(f"{where} = {str(path)!r}: no such file{resolved} (write the path of {what}, absolute or relative to the configuration file's folder)")
    return p


def _check_listeners(node: NodeSettings, base_dir: Path, problems: list[str]) -> None:
    tls = node.tls
    if tls is None:
        if node.port == 0:
            problems.append("[node] port = 0 turns the plain listener off: add a [node.tls] listener, or write a port from 1 to 65535")
        return
    tls.certificate = _check_file(tls.certificate, "[node.tls] certificate", base_dir, problems)  # type: ignore[assignment]
    tls.private_key = _check_file(tls.private_key, "[node.tls] private_key", base_dir, problems)  # type: ignore[assignment]
    tls.ca_certificates = _check_file(tls.ca_certificates, "[node.tls] ca_certificates", base_dir, problems)
    if tls.require_client_certificate and tls.ca_certificates is None:
        problems.append("[node.tls] require_client_certificate = true needs ca_certificates = \"...\" (the CAs client certificates must chain to), or write require_client_certificate = false")
    if tls.port == node.port:
        problems.append(f"[node.tls] port = {tls.port}: the TLS listener needs another port than [node] port")


def _check_source_certificates(sources: list[Source], node: NodeSettings, problems: list[str]) -> None:
    """A source bound to a client certificate needs a TLS listener that verifies one."""
    bound = [s.ae_title for s in sources if s.certificate_cn]
    if bound and (node.tls is None or node.tls.ca_certificates is None):
        problems.append(f"[[sources]] {bound[0]!r} certificate_cn needs [node.tls] with ca_certificates = \"...\" (the CAs client certificates are verified against); "
                        "or remove certificate_cn")


def _check_destination_security(dest: Destination, where: str, base_dir: Path, problems: list[str]) -> None:
    if dest.tls is not None:
        if dest.kind == "folder":
            problems.append(f"{where}: tls = {{ ... }} applies to dicom and dicomweb destinations only")
        t = dest.tls
        t.ca_certificates = _check_file(t.ca_certificates, f"{where} tls.ca_certificates", base_dir, problems)
        t.certificate = _check_file(t.certificate, f"{where} tls.certificate", base_dir, problems)
        t.private_key = _check_file(t.private_key, f"{where} tls.private_key", base_dir, problems)
        if (t.certificate is None) != (t.private_key is None):
            problems.append(f"{where}: tls.certificate and tls.private_key go together (a client certificate needs its key)")
    if dest.auth is not None:
        a = dest.auth
        if dest.kind != "dicomweb":
            problems.append(f"{where}: auth = {{ ... }} applies to dicomweb destinations only")
        elif not dest.url.startswith("https://") and not _loopback(urlsplit(dest.url).hostname or ""):
            # An archive on this machine (loopback) is reached without crossing a network.
            problems.append(f"{where}: auth needs an https:// url: the credentials would cross the network in clear "
                            "(http:// with auth is taken for an archive on this machine only: 127.0.0.1, ::1, localhost)")
        if (a.secret_file is None) == (not a.secret_env):
            problems.append(f"{where}: auth needs one of secret_file = \"...\" or secret_env = \"NAME\"")
        a.secret_file = _check_file(a.secret_file, f"{where} auth.secret_file", base_dir, problems,
                                    "a file holding the token" if a.kind == "bearer" else "a file holding the password")
        if a.kind == "basic" and not a.username:
            problems.append(f"{where}: auth kind = \"basic\" needs username = \"...\"")


def _check_destination(dest: Destination, where: str, base_dir: Path, problems: list[str]) -> None:
    _check_destination_security(dest, where, base_dir, problems)
    if dest.kind == "dicom":
        if not valid_ae_title(dest.ae_title):
            problems.append(f"{where} ae_title = {dest.ae_title!r}: a dicom destination needs the archive's AE title")
        if not 1 <= dest.port <= 65535:
            problems.append(f"{where} port = {dest.port!r}: a TCP port is an integer from 1 to 65535")
    elif dest.kind == "folder":
        if not dest.path:
            problems.append(f"{where}: a folder destination needs path = \"DIR\"")
        else:
            dest.path = _absolute(dest.path, base_dir)
    elif dest.kind == "dicomweb" and not dest.url.startswith(("http://", "https://")):
        problems.append(f"{where}: a dicomweb destination needs url = \"http://host:port/dicom-web\"")
    elif dest.kind == "dicomweb" and dest.url.startswith("http://") and "@" in dest.url.split("/", 3)[2]:
        problems.append(f"{where}: a user or password in an http:// url would travel in clear: use an https:// url with auth = {{ ... }}")
    if dest.calling_ae and not valid_ae_title(dest.calling_ae):
        problems.append(f"{where} calling_ae = {dest.calling_ae!r}: an AE title is 1 to 16 characters")


def _loopback(host: str) -> bool:
    """True when ``host`` (an address or name from the configuration) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _check_model(model: ModelSettings, where: str, base_dir: Path, problems: list[str]) -> None:
    if model.backend != "triton":
        for key in ("url", "triton_model", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(model, key):
                problems.append(f"{where}: {key} is used by backend = \"triton\" only")
        return
    m = _HOST_PORT.match(model.url)
    if not model.url:
        problems.append(f"{where}: backend = \"triton\" needs url = \"host:port\" (the Triton server's gRPC port, 8001 by default)")
    elif not m or not 1 <= int(m.group(2)) <= 65535:
        problems.append(f"{where} url = {model.url!r}: write the Triton server's gRPC address as \"host:port\", e.g. \"gpu-host:8001\" (no scheme)")
    if (model.tls_cert_file is None) != (model.tls_key_file is None):
        problems.append(f"{where}: tls_cert_file and tls_key_file go together")
    if model.tls_cert_file is not None and model.tls_ca_file is None:
        problems.append(f"{where}: a client certificate needs TLS: add tls_ca_file = \"ca.pem\"")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = _absolute(getattr(model, key), base_dir)
        setattr(model, key, path)
        if path is not None and not path.is_file():
            problems.append(f"{where} {key} = '{path}': no such file")


def _check_route(route: Route, where: str, dest_names: set[str], model_names: set[str], problems: list[str], warnings: list[str]) -> None:
    if not route.destinations:
        problems.append(f"{where}: destinations = [...] names at least one destination")
    for dn in route.destinations:
        if dn not in dest_names:
            problems.append(f"{where}: destination {dn!r} is not defined in [[destinations]]{did_you_mean(dn, dest_names)} (defined: {', '.join(sorted(dest_names)) or 'none'})")
    if route.pixels == "anonymize" and route.model not in model_names:
        problems.append(f"{where}: model {route.model!r} is not defined in [[models]]{did_you_mean(route.model, model_names)} (defined: {', '.join(sorted(model_names)) or 'none'})")
    if route.pixels == "anonymize" and route.deid is None:
        problems.append(f"{where}: pixels = \"anonymize\" needs a header profile (deid = {{ profile = \"basic\" }}): derived images would carry the whole original header")
    if route.counterfactuals and route.pixels != "anonymize":
        problems.append(f"{where}: counterfactuals = true needs pixels = \"anonymize\"")
    if route.index and route.pixels != "anonymize":
        problems.append(f"{where}: index = true needs pixels = \"anonymize\" (the index holds anonymized images only, never original pixels)")
    from node.routing import check_match, match_warnings

    if isinstance(route.match, dict):
        problems.extend(f"{where} match: {p}" for p in check_match(route.match))
        warnings.extend(f"{where} match: {w}" for w in match_warnings(route.match))


def read_toml(p: Path) -> dict[str, Any]:
    """The parsed TOML document in ``p``.

    Raises:
        ConfigError: the file is missing or not TOML.
    """
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError([f"no such file: {p}"], str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        quote = ("; text needs double quotes (ae_title = \"CASEMASK\"), numbers and true/false none (port = 11112)"
                 if str(exc).startswith("Invalid value") else "")
        raise ConfigError([f"not valid TOML: {exc}{quote}"], str(p)) from None


def _check_pixel_models(routes: list[Route], models: list[ModelSettings], problems: list[str]) -> None:
    """A route that anonymizes pixels needs a bundle with gates, and, for a bundle that is
    a demonstration (or says nothing of its intended use), ``allow_demonstration_model``."""
    from engine.bundle import BundleError
    from engine.bundle import load as load_bundle

    by_name = {m.name: m for m in models} | ({} if any(m.name == "reference" for m in models) else {"reference": ModelSettings(name="reference")})
    for route in routes:
        ms = by_name.get(route.model)
        if route.pixels != "anonymize" or ms is None:
            continue
        where = f"[[routes]] '{route.name}'"
        try:
            b = load_bundle(ms.path)
        except (BundleError, OSError, ValueError) as exc:
            problems.append(f"{where}: model {ms.name!r} path = {ms.path!r}: {exc}")
            continue
        if not b.has_gates:
            problems.append(f"{where}: model {ms.name!r} ({ms.path}) has no gates, so nothing would check its images before they leave: "
                            f"run `casemask engine fit-gates --model {ms.path}`")
        use = b.intended_use
        if b.is_demonstration and not route.allow_demonstration_model:
            problems.append(f"{where}: model {ms.name!r} ({ms.path}) is a demonstration ({use['summary']}); "
                            "pixels = \"anonymize\" would forward what it draws as this patient's images. Write allow_demonstration_model = true "
                            "in this route to run it anyway (demonstrations, tests), use a bundle trained for your images, or pixels = \"none\"")


def base_dir_for(path: str | Path | None) -> Path:
    """The folder that relative paths in the configuration file ``path`` are resolved
    against: the folder the file is named in (as nginx or Orthanc do), so that a file means the
    same wherever a command is run. The files casemask ships (``config/``: the built-in
    configuration, ``demo.toml``; ``path`` None) are the exception: their relative paths
    (``data_dir = "var"``) are relative to the working folder, as a package's own folder
    is no place for data."""
    # absolute(), not resolve(): a file reached through a link (a Kubernetes ConfigMap's
    # files are links into a hidden folder beside them) means the folder it is named in.
    return Path.cwd() if is_shipped(path) else Path(path).absolute().parent  # type: ignore[arg-type]


def is_shipped(path: str | Path | None) -> bool:
    """True for None (the built-in configuration) and the files of casemask's ``config/``."""
    return path is None or Path(path).resolve().parent == DEFAULT_CONFIG.resolve().parent


def load(path: str | Path | None = None) -> Settings:
    """Load and validate a TOML file (the built-in config when ``path`` is None).

    Relative paths inside the file are resolved against the file's folder
    (:func:`base_dir_for`; the working folder for the files casemask ships), so
    ``data_dir = "var"`` in ``/etc/casemask/site.toml`` means ``/etc/casemask/var``.

    Raises:
        ConfigError: the file is missing, not TOML, or has invalid settings.
    """
    p = Path(path) if path is not None else DEFAULT_CONFIG
    raw = read_toml(p)
    settings = parse(raw, str(p), base_dir_for(path))
    settings.source_file = p
    if not is_shipped(path):
        _check_data_dir_not_moved(raw, settings.node, p)
    return settings


def _has_node_data(folder: Path) -> bool:
    """A node's database, pseudonym secret, or spool (a node on PostgreSQL with
    ``secret_env`` keeps only its spool and outbox there)."""
    return (folder / "casemask.db").exists() or (folder / "secret.key").exists() or (folder / "spool").is_dir()


def _check_data_dir_not_moved(raw: dict[str, Any], node: NodeSettings, p: Path) -> None:
    """Refuse a relative ``data_dir`` that, read relative to the file's folder, holds no
    node's data while the same path under the working folder (where versions before
    this one read it) does: starting there would make a new database and a new
    pseudonym secret, and every pseudonym would change. Written as an absolute path,
    either folder is taken. The same for a relative ``secret_path`` and a relative
    SQLite ``database_url``: absent relative to the file's folder, present relative to
    the working folder (a new secret, or a new empty database beside the old one).

    Raises:
        ConfigError: saying both folders and what to write.
    """
    table = raw.get("node")
    table = table if isinstance(table, dict) else {}
    written = table.get("data_dir", "var")
    if isinstance(written, str) and not Path(written).is_absolute():
        before = (Path.cwd() / written).resolve()
        if before != node.data_dir.resolve() and not _has_node_data(node.data_dir) and _has_node_data(before):
            raise ConfigError([f"[node] data_dir = {written!r}: relative paths are now relative to the configuration file's folder, "
                               f"and {node.data_dir} holds no node's data, while {before} (relative to the working folder, as before) "
                               f"holds a node's database, pseudonym secret or spool. Write the folder you mean as an absolute path: "
                               f"data_dir = \"{before}\" to keep that node's data, or data_dir = \"{node.data_dir}\" for a new node"], str(p))
    files = []
    secret = table.get("secret_path")
    if isinstance(secret, str) and secret and not Path(secret).is_absolute() and node.secret_path is not None:
        files.append(("secret_path", secret, secret, node.secret_path))
    url = table.get("database_url")
    if isinstance(url, str) and url.startswith("sqlite:///"):
        file = url.removeprefix("sqlite:///").partition("?")[0]
        if file and not file.startswith(":memory:") and not Path(file).is_absolute():
            files.append(("database_url", url, file, Path(node.database_url.removeprefix("sqlite:///").partition("?")[0])))
    for key, shown, file, now in files:
        before = (Path.cwd() / file).resolve()
        if before != now.resolve() and not now.exists() and before.exists():
            what = "pseudonym secret (every pseudonym would change)" if key == "secret_path" else "empty database beside the node's"
            raise ConfigError([f"[node] {key} = {shown!r}: relative paths are now relative to the configuration file's folder, "
                               f"and {now} does not exist, while {before} (relative to the working folder, as before) does: "
                               f"a start would make a new {what}. Write the file you mean as an absolute path ({before} to keep it)"], str(p))

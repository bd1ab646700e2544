"""Typed, validated settings loaded once from TOML at the entry point and passed down.

``load(path)`` reads a file; ``load(None)`` reads the built-in ``config/casemask.toml``.
Every problem is collected and raised together in :class:`ConfigError`, each message
naming the setting and what to put there instead.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "casemask.toml"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 chars, no backslash or control
ROUTE_SPECIAL_KEYS = ("calling_ae", "called_ae")


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclasses.dataclass
class NodeSettings:
    ae_title: str = "CASEMASK"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("var")
    database_url: str = ""
    secret_path: Path | None = None
    stable_after_s: float = 30.0
    accept_unknown_sources: bool = False
    unrouted: Literal["hold", "discard"] = "hold"
    lease_s: float = 300.0
    poll_interval_s: float = 1.0
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    max_attempts: int = 20
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    reactor_delay_s: float = 0.00005  # pynetdicom sleeps 1 ms per idle reactor loop by default

    @property
    def resolved_secret_path(self) -> Path:
        return self.secret_path or self.data_dir / "secret.key"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'casemask.db').resolve()}"


@dataclasses.dataclass
class Source:
    ae_title: str
    host: str | None = None


@dataclasses.dataclass
class Destination:
    name: str
    kind: Literal["dicom", "folder", "dicomweb"] = "dicom"
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    path: Path | None = None
    url: str = ""
    calling_ae: str = ""  # defaults to the node's AE title
    timeout_s: float = 30.0


@dataclasses.dataclass
class DeidSettings:
    profile: str = "basic"
    options: list[str] = dataclasses.field(default_factory=list)
    keep: list[str] = dataclasses.field(default_factory=list)
    remove: list[str] = dataclasses.field(default_factory=list)
    replace: dict[str, str] = dataclasses.field(default_factory=dict)
    date_shift_days: tuple[int, int] = (-365, -1)
    burned_in: Literal["quarantine", "allow"] = "quarantine"


@dataclasses.dataclass
class Route:
    name: str
    match: dict[str, Any] = dataclasses.field(default_factory=dict)
    deid: DeidSettings | None = dataclasses.field(default_factory=DeidSettings)
    pixels: Literal["none", "anonymize"] = "none"
    counterfactuals: bool = False
    model: str = "reference"
    output_size: Literal["model", "original"] = "model"
    partial: Literal["quarantine-study", "skip-object"] = "quarantine-study"
    destinations: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ModelSettings:
    name: str
    path: str = "builtin:reference"
    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = "auto"
    batch_size: int = 32


@dataclasses.dataclass
class Settings:
    node: NodeSettings = dataclasses.field(default_factory=NodeSettings)
    sources: list[Source] = dataclasses.field(default_factory=list)
    destinations: list[Destination] = dataclasses.field(default_factory=list)
    routes: list[Route] = dataclasses.field(default_factory=list)
    models: list[ModelSettings] = dataclasses.field(default_factory=list)
    source_file: Path | None = None

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


def valid_ae_title(value: Any) -> bool:
    return isinstance(value, str) and bool(_AE_RE.match(value)) and value.strip() != ""


def _build(cls: type, raw: dict[str, Any], where: str, problems: list[str]) -> Any:
    """Instantiate a settings dataclass from a table, checking names and simple types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{where}: unknown setting '{key}' (known: {', '.join(sorted(fields))})")
            continue
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        problems.append(f"{where}: {exc}")
        return None


def _check_choice(value: Any, choices: tuple[str, ...], where: str, problems: list[str]) -> None:
    if value not in choices:
        problems.append(f"{where} = {value!r}: choose one of {', '.join(repr(c) for c in choices)}")


def _check_port(value: Any, where: str, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        problems.append(f"{where} = {value!r}: a TCP port is an integer from 1 to 65535")


def parse(raw: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> Settings:
    """Validate a parsed TOML document and return :class:`Settings` (or raise ConfigError)."""
    problems: list[str] = []
    base_dir = base_dir or Path.cwd()
    known = {"node", "sources", "destinations", "routes", "models"}
    for key in raw:
        if key not in known:
            problems.append(f"unknown table [{key}] (known: {', '.join(sorted(known))})")

    node = _build(NodeSettings, raw.get("node", {}), "[node]", problems) or NodeSettings()
    if not valid_ae_title(node.ae_title):
        problems.append(f"[node] ae_title = {node.ae_title!r}: an AE title is 1 to 16 characters, no backslash")
    _check_port(node.port, "[node] port", problems)
    _check_choice(node.unrouted, ("hold", "discard"), "[node] unrouted", problems)
    if not isinstance(node.stable_after_s, (int, float)) or node.stable_after_s < 0:
        problems.append(f"[node] stable_after_s = {node.stable_after_s!r}: seconds, 0 or more")
    node.data_dir = Path(node.data_dir)
    if not node.data_dir.is_absolute():
        node.data_dir = (base_dir / node.data_dir).resolve()
    if node.secret_path is not None:
        node.secret_path = Path(node.secret_path)
        if not node.secret_path.is_absolute():
            node.secret_path = (base_dir / node.secret_path).resolve()

    sources = []
    for k, s in enumerate(raw.get("sources", [])):
        src = _build(Source, s, f"[[sources]] #{k + 1}", problems)
        if src is None:
            continue
        if not valid_ae_title(src.ae_title):
            problems.append(f"[[sources]] #{k + 1} ae_title = {src.ae_title!r}: an AE title is 1 to 16 characters")
        sources.append(src)

    destinations = []
    for k, d in enumerate(raw.get("destinations", [])):
        dest = _build(Destination, d, f"[[destinations]] #{k + 1}", problems)
        if dest is None:
            continue
        where = f"[[destinations]] '{dest.name}'"
        _check_choice(dest.kind, ("dicom", "folder", "dicomweb"), f"{where} kind", problems)
        if dest.kind == "dicom":
            if not valid_ae_title(dest.ae_title):
                problems.append(f"{where} ae_title = {dest.ae_title!r}: a dicom destination needs the archive's AE title")
            _check_port(dest.port, f"{where} port", problems)
        elif dest.kind == "folder":
            if not dest.path:
                problems.append(f"{where}: a folder destination needs path = \"DIR\"")
            else:
                dest.path = Path(dest.path)
                if not dest.path.is_absolute():
                    dest.path = (base_dir / dest.path).resolve()
        elif dest.kind == "dicomweb" and not str(dest.url).startswith(("http://", "https://")):
            problems.append(f"{where}: a dicomweb destination needs url = \"http://host:port/dicom-web\"")
        if dest.calling_ae and not valid_ae_title(dest.calling_ae):
            problems.append(f"{where} calling_ae = {dest.calling_ae!r}: an AE title is 1 to 16 characters")
        if any(d2.name == dest.name for d2 in destinations):
            problems.append(f"{where}: two destinations have this name")
        destinations.append(dest)

    models = []
    for k, m in enumerate(raw.get("models", [])):
        ms = _build(ModelSettings, m, f"[[models]] #{k + 1}", problems)
        if ms is None:
            continue
        _check_choice(ms.backend, ("auto", "tensorrt", "onnxruntime", "torch"), f"[[models]] '{ms.name}' backend", problems)
        models.append(ms)
    model_names = {m.name for m in models} | {"reference"}

    routes = []
    dest_names = {d.name for d in destinations}
    for k, r in enumerate(raw.get("routes", [])):
        r = dict(r)
        deid_raw = r.pop("deid", {})
        route = _build(Route, r, f"[[routes]] #{k + 1}", problems)
        if route is None:
            continue
        where = f"[[routes]] '{route.name}'"
        if deid_raw is False or deid_raw == "none":
            route.deid = None
        else:
            if "date_shift_days" in deid_raw:
                deid_raw = dict(deid_raw)
                deid_raw["date_shift_days"] = tuple(deid_raw["date_shift_days"])
            route.deid = _build(DeidSettings, deid_raw, f"{where} deid", problems)
            if route.deid is not None:
                from node.deid.profile import OPTIONS

                for opt in route.deid.options:
                    if opt not in OPTIONS:
                        problems.append(f"{where} deid option {opt!r}: choose from {', '.join(OPTIONS)}")
                lo, hi = route.deid.date_shift_days
                if lo > hi:
                    problems.append(f"{where} deid date_shift_days = [{lo}, {hi}]: the first must not exceed the second")
        _check_choice(route.pixels, ("none", "anonymize"), f"{where} pixels", problems)
        _check_choice(route.partial, ("quarantine-study", "skip-object"), f"{where} partial", problems)
        _check_choice(route.output_size, ("model", "original"), f"{where} output_size", problems)
        if not route.destinations:
            problems.append(f"{where}: destinations = [...] names at least one destination")
        for dn in route.destinations:
            if dn not in dest_names:
                problems.append(f"{where}: destination {dn!r} is not defined in [[destinations]] (defined: {', '.join(sorted(dest_names)) or 'none'})")
        if route.pixels == "anonymize" and route.model not in model_names:
            problems.append(f"{where}: model {route.model!r} is not defined in [[models]]")
        if route.counterfactuals and route.pixels != "anonymize":
            problems.append(f"{where}: counterfactuals = true needs pixels = \"anonymize\"")
        if not isinstance(route.match, dict):
            problems.append(f"{where}: match is a table, e.g. match = {{ Modality = [\"CR\", \"DX\"] }}")
        else:
            from node.routing import check_match

            problems.extend(f"{where} match: {p}" for p in check_match(route.match))
        if any(r2.name == route.name for r2 in routes):
            problems.append(f"{where}: two routes have this name")
        routes.append(route)

    if problems:
        raise ConfigError(problems, source)
    return Settings(node=node, sources=sources, destinations=destinations, routes=routes, models=models)


def load(path: str | Path | None = None) -> Settings:
    """Load and validate a TOML file (the built-in config when ``path`` is None).

    Relative paths inside the file are resolved against the current directory, so
    ``data_dir = "var"`` means ``./var`` where the node is started.

    Raises:
        ConfigError: the file is missing, not TOML, or has invalid settings.
    """
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError([f"no such file: {p}"], str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(p)) from None
    settings = parse(raw, str(p))
    settings.source_file = p
    return settings

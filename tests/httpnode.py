"""Helpers for tests of the operator's HTTP server: a node with its HTTP server, started
from a configuration file (so that it can be changed over the API), tokens per role."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from node import accounts
from node.app import Node
from node.config import load
from tests.conftest import _stop_all, write_toml


@dataclasses.dataclass
class HttpNode:
    node: Node
    base: str
    config: Path
    tokens: dict[str, str]

    def client(self, role: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as 'name{labels}' -> value."""
        text = self.client("viewer").get("/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def start_http_node(raw: dict, tmp_path: Path, pixel_step=None, name: str = "node.toml") -> HttpNode:
    """Write ``raw`` to a TOML file, start a node from it with its HTTP server, and make
    one token per role. The caller stops ``node``."""
    cfg = write_toml(raw, tmp_path / name)
    settings = load(cfg)
    node = Node(settings, pixel_step=pixel_step)
    try:  # the caller stops it only once it has it: a failed start stops what it started here
        node.start(http=True)
        tokens = {}
        with node.sessions() as s:
            for role in ("viewer", "operator", "admin"):
                tokens[role] = accounts.create_token(s, f"test-{role}", role)
            s.commit()
    except BaseException:
        node.stop()
        raise
    return HttpNode(node, f"http://127.0.0.1:{settings.http.port}", cfg, tokens)


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The value of one sample (0 when absent); labels in any order."""
    for key, value in metrics.items():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", key)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


@pytest.fixture
def http_nodes():
    """A list to put started :class:`HttpNode` in; each is stopped at teardown."""
    made: list[HttpNode] = []
    yield made
    _stop_all([hn.node.stop for hn in made])


def breakable_deid(monkeypatch) -> dict[str, bool]:
    """Make header de-identification fail while ``switch["on"]`` is true (a cause an
    admin can fix); returns the switch."""
    from node.deid import Deidentifier

    real_apply = Deidentifier.apply
    switch = {"on": False}

    def apply(self, ds, extra_codes=()):
        if switch["on"]:
            raise RuntimeError("simulated de-identification failure")
        return real_apply(self, ds, extra_codes=extra_codes)

    monkeypatch.setattr(Deidentifier, "apply", apply)
    return switch

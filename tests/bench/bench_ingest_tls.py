"""Durable ingest over DICOM TLS: casemask vs Orthanc, both over TLS, same corpus, same
sender, with the plain-TCP ratio beside it.

    python tests/bench/bench_ingest_tls.py [--instances 500] [--rounds 5]

Both peers store durably (Orthanc with SyncStorageArea, casemask with fsync and a
committed row before Success) and both require and verify a client certificate (TLS 1.2+
as each negotiates with dcmtk's default BCP 195 profile). The sender is dcmtk storescu
(``+tls``, TCP_NODELAY=1), one association per run. Each round sends the corpus to the
four targets (casemask TLS, Orthanc TLS, casemask plain, Orthanc plain) in a rotated
order, each into empty storage. Certificates are made for the run (tests/pki.py).
Prints each run, then per target the median and spread (min-max) in instances/s, and
the ratios casemask/Orthanc over TLS and over plain TCP (medians of per-round ratios).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import STORESCU, NodeProcess, Orthanc, dcmtk_env, free_port, make_study, node_config, wait_until, write_toml  # noqa: E402
from tests.pki import CA  # noqa: E402


def send(port: int, corpus: Path, aec: str, tls: tuple[str, ...] = ()) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([STORESCU, "-aec", aec, *tls, "+sd", "127.0.0.1", str(port), str(corpus)], env=dcmtk_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"storescu to {aec} ({'TLS' if tls else 'plain'}) failed: {r.stderr[-500:]}")
    return dt


def write_node_toml(work: Path, rnd: int, pki: dict) -> tuple[Path, int, int]:
    raw = node_config(work / f"node{rnd}", [{"name": "f", "kind": "folder", "path": str(work / f"out{rnd}")}], stable_after_s=86400)
    tls_port = free_port()
    raw["node"]["tls"] = {
        "port": tls_port,
        "certificate": str(pki["node"].cert),
        "private_key": str(pki["node"].key),
        "ca_certificates": str(pki["ca"].pair.cert),
        "require_client_certificate": True,
    }
    cfg = write_toml(raw, work / f"node{rnd}.toml")  # [node] tls = { ... }: an inline table
    return cfg, raw["node"]["port"], tls_port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="casemask-bench-tls-"))
    ca = CA(work / "pki")
    pki = {"ca": ca, "node": ca.issue("casemask", server=True), "orthanc": ca.issue("orthanc", server=True), "sender": ca.issue("modality", client=True)}
    tls_args = ("+tls", str(pki["sender"].key), str(pki["sender"].cert), "+cf", str(ca.pair.cert))
    corpus = work / "corpus"
    make_study(corpus, args.instances)
    size_kb = sum(p.stat().st_size for p in corpus.iterdir()) / args.instances / 1024
    print(f"corpus: {args.instances} CT instances, {size_kb:.0f} KB each; sender: dcmtk storescu, TCP_NODELAY=1, one association; TLS: client certificates required by both")
    rates: dict[str, list[float]] = {k: [] for k in ("casemask TLS", "Orthanc TLS", "casemask plain", "Orthanc plain")}
    try:
        for rnd in range(args.rounds):
            orthanc_tls = Orthanc(work / f"orthanc-tls{rnd}", extra={
                "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki["orthanc"].cert), "DicomTlsPrivateKey": str(pki["orthanc"].key),
                "DicomTlsTrustedCertificates": str(ca.pair.cert), "DicomTlsRemoteCertificateRequired": True})
            orthanc_plain = Orthanc(work / f"orthanc-plain{rnd}")
            cfg, port, tls_port = write_node_toml(work, rnd, pki)
            node = NodeProcess(cfg, work / f"node{rnd}.log")
            node.start(port)
            try:
                targets = [
                    ("casemask TLS", tls_port, "CASEMASK", tls_args),
                    ("Orthanc TLS", orthanc_tls.dicom_port, orthanc_tls.aet, tls_args),
                    ("casemask plain", port, "CASEMASK", ()),
                    ("Orthanc plain", orthanc_plain.dicom_port, orthanc_plain.aet, ()),
                ]
                order = targets[rnd % 4 :] + targets[: rnd % 4]
                for name, p, aec, tls in order:
                    dt = send(p, corpus, aec, tls)
                    rates[name].append(args.instances / dt)
                    print(f"round {rnd + 1}: {name:<15} {args.instances / dt:7.1f} instances/s ({dt:.2f} s)")
                for o in (orthanc_tls, orthanc_plain):
                    wait_until(lambda o=o: o.get("/statistics")["CountInstances"] == args.instances, timeout=60, what="Orthanc count")
            finally:
                node.stop()
                orthanc_tls.stop()
                orthanc_plain.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, values in rates.items():
        print(f"{name:<15} median {statistics.median(values):7.1f}/s  spread {min(values):.1f}-{max(values):.1f}")
    tls_ratio = statistics.median(a / b for a, b in zip(rates["casemask TLS"], rates["Orthanc TLS"]))
    plain_ratio = statistics.median(a / b for a, b in zip(rates["casemask plain"], rates["Orthanc plain"]))
    print(f"ratio casemask/Orthanc: TLS {tls_ratio:.2f} (target >= 1.0), plain TCP {plain_ratio:.2f}; TLS cost: casemask {statistics.median(a / b for a, b in zip(rates['casemask TLS'], rates['casemask plain'])):.2f}x its plain rate, Orthanc {statistics.median(a / b for a, b in zip(rates['Orthanc TLS'], rates['Orthanc plain'])):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

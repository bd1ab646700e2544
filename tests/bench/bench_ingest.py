"""Durable ingest rate: casemask vs Orthanc, same corpus, same senders, side by side.

    python tests/bench/bench_ingest.py [--rounds 5] [--loads single,concurrent] [--big-mb 1024] [--node KEY=VALUE ...] [--variant KEY=VALUE ...]

Two loads, each over ``--rounds`` rounds (at least 5 for a median worth quoting):

- ``single``: one dcmtk storescu sends ``--instances`` CT objects of one study over one
  association;
- ``concurrent``: ``--senders`` storescu processes at once, each sending ``--per-sender``
  objects of its own study over its own association.

Every round starts a fresh casemask node (fresh data folder), a fresh Orthanc (fresh
storage) and a fresh *ceiling*: a pynetdicom SCP (a subprocess) that accepts every
object and stores nothing, so the senders' and the DICOM stack's own cost is visible.
The three are sent to in an order that rotates from round to round. Both real peers
store durably: Orthanc with SyncStorageArea, casemask with fsync + committed row before
Success; after each round the bench checks that each holds every object.

``--variant KEY=VALUE`` (repeatable; e.g. ``--variant receivers=1``, or
``--variant parallel_durability=false`` for the serial fsyncs of before) adds a second node
to every round, with those [node] settings on top of ``--node``'s, sent to in the same
rotation: two configurations side by side under the same load.

Printed: every round (the machine's load average, instances/s of each, the ratio
casemask/Orthanc, the CPU seconds the node's processes used per 1000 objects, from
/proc utime + stime of the node and its receivers, the node's and Orthanc's peak
resident memory, read from /proc VmHWM of each process, summed over the node's
processes), then per load the median ratio and its spread (min-max over the rounds).
The machine is shared: quote the spread with the median; CPU seconds per object move
less with the load than rates do.

``--big-mb N`` (0: skip) sends one object of N MiB to a fresh node and prints how much
its resident memory grew while receiving it (sampled every 20 ms; target: under 300 MB
for 1024).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import STORESCU, NodeProcess, Orthanc, dcmtk_env, free_port, make_study, node_config, port_listens, stop_process, wait_until, write_toml  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# -- the ceiling: an SCP that stores nothing ---------------------------------------------------
def null_scp(port: int) -> int:
    """Run a pynetdicom C-STORE SCP on ``port`` that answers Success and keeps nothing
    (as a subprocess of the bench: ``--null-scp PORT``), with the node's socket and
    reactor tuning (TCP_NODELAY, node.reactor's waits) so that only storing differs."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from node import reactor, scp

    delay = 0.00005  # [node] reactor_delay_s's default
    reactor.install(delay)

    def on_open(event) -> None:
        scp.tune_association(event.assoc, delay)

    def on_store(event) -> int:
        reactor.mark_busy()
        return 0x0000

    ae = AE(ae_title="CEILING")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = 64
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
    return 0


class Ceiling:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.aet = "CEILING"
        self.log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, __file__, "--null-scp", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=dcmtk_env())
        wait_until(lambda: _listening(self.port, self.proc), timeout=60, what="the ceiling SCP to listen")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.log.close()


def _listening(port: int, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"process exited with {proc.returncode}")
    return port_listens(port)


# -- memory ----------------------------------------------------------------------------------
def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) summed over ``pid`` and its descendants, MiB."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid)) / 1024


def rss_mib(pid: int) -> float:
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) / 1024


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants (/proc stat)."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


# -- senders ---------------------------------------------------------------------------------
class SendFailed(Exception):
    """A storescu of a round did not store everything: the round is not counted."""


def send(port: int, corpora: list[Path], aec: str) -> float:
    """Seconds from starting one storescu per corpus folder (all at once) until the last
    one finished; fails the bench if any of them did not store everything."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", aec, "+sd", "127.0.0.1", str(port), str(c)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in corpora]
    outs = [p.communicate(timeout=900) for p in procs]
    dt = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SendFailed(f"storescu to {aec} failed (exit {p.returncode}): {(err or out)[-500:].strip() or 'no output'}")
    return dt


def node_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "casemask.db") as db:
        return db.execute("select count(*) from instances").fetchone()[0]


# The tests' node_config polls the queue every 0.1 s (tests wait less); the bench runs
# the node as shipped (NodeSettings.poll_interval_s), unless --node sets it.
SHIPPED = {"poll_interval_s": 1.0}


def start_node(work: Path, tag: str, **node_kw) -> tuple[NodeProcess, dict]:
    """Start a node and wait until it says it started: by then every receiving process
    accepts (they share one listening socket, which the node process makes listen once
    its receivers are ready: node.sharedport)."""
    raw = node_config(work / f"node-{tag}", [{"name": "f", "kind": "folder", "path": str(work / f"out-{tag}")}], stable_after_s=86400, **{**SHIPPED, **node_kw})
    cfg = write_toml(raw, work / f"node-{tag}.toml")
    node = NodeProcess(cfg, work / f"node-{tag}.log")
    port = raw["node"]["port"]
    try:
        node.start(port)
    except (RuntimeError, AssertionError, TimeoutError):
        print((work / f"node-{tag}.log").read_text()[-3000:], file=sys.stderr)
        raise
    return node, raw


# -- one round -------------------------------------------------------------------------------
def _setting(value: str) -> int | bool:
    """A --node / --variant value: true or false (a switch such as parallel_durability), else an integer."""
    switch = {"true": True, "false": False}
    return switch[value.lower()] if value.lower() in switch else int(value)


def run_round(work: Path, tag: str, corpora: list[Path], total: int, rnd: int, node_kw: dict, variant_kw: dict) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        orthanc = Orthanc(work / f"orthanc-{tag}")
        stack.callback(orthanc.stop)
        ceiling = Ceiling(work / f"ceiling-{tag}.log")
        stack.callback(ceiling.stop)
        nodes = {"casemask": start_node(work, tag, **node_kw)}
        stack.callback(nodes["casemask"][0].stop)
        if variant_kw:
            nodes["variant"] = start_node(work, f"{tag}v", **{**node_kw, **variant_kw})
            stack.callback(nodes["variant"][0].stop)
        res = _send_all(nodes, orthanc, ceiling, corpora, total, rnd)
    for name, (_, raw) in nodes.items():
        stored = node_rows(Path(raw["node"]["data_dir"]))
        if stored != total:
            raise SystemExit(f"round {rnd + 1}: {name} holds {stored} rows, {total} were acknowledged")
    for t in (tag, f"{tag}v"):
        for d in (work / f"orthanc-{t}", work / f"node-{t}", work / f"out-{t}"):
            shutil.rmtree(d, ignore_errors=True)
    return res


def _send_all(nodes: dict[str, tuple[NodeProcess, dict]], orthanc: Orthanc, ceiling: Ceiling, corpora: list[Path], total: int, rnd: int) -> dict[str, float]:
    """Send the corpora to each peer, in an order rotated by the round; their rates,
    the nodes' CPU seconds per 1000 objects and peak memory."""
    res: dict[str, float] = {"load": os.getloadavg()[0]}
    peers = [(name, raw["node"]["port"], "CASEMASK") for name, (_, raw) in nodes.items()] + [("orthanc", orthanc.dicom_port, orthanc.aet), ("ceiling", ceiling.port, ceiling.aet)]
    k = rnd % len(peers)
    for name, port, aec in peers[k:] + peers[:k]:
        pid = nodes[name][0].proc.pid if name in nodes else None  # type: ignore[union-attr]
        before = cpu_s(pid) if pid else 0.0
        res[name] = total / send(port, corpora, aec)
        if pid:
            res[f"{name}_cpu"] = (cpu_s(pid) - before) * 1000 / total
    for name, (node, _) in nodes.items():
        res[f"{name}_rss"] = peak_rss_mib(node.proc.pid)  # type: ignore[union-attr]
    res["orthanc_rss"] = peak_rss_mib(orthanc.proc.pid)
    wait_until(lambda: orthanc.get("/statistics")["CountInstances"] == total, timeout=120, what="Orthanc to count every object")
    return res


def run_load(work: Path, name: str, corpora: list[Path], total: int, rounds: int, node_kw: dict, variant_kw: dict) -> list[dict[str, float]]:
    print(f"\n== load {name}: {len(corpora)} sender(s) x {total // len(corpora)} instances, {rounds} rounds", flush=True)
    label = {"casemask": "casemask", "variant": "variant " + ",".join(f"{k}={v}" for k, v in variant_kw.items())}
    nodes = ["casemask", "variant"] if variant_kw else ["casemask"]
    results = []
    for rnd in range(rounds):
        try:
            r = run_round(work, f"{name}{rnd}", corpora, total, rnd, node_kw, variant_kw)
        except SendFailed as exc:  # one failed sender ends the round, not the run
            print(f"round {rnd + 1}: not counted: {exc}", flush=True)
            continue
        results.append(r)
        each = "  ".join(f"{label[n]} {r[n]:6.1f}/s ratio {r[n] / r['orthanc']:.2f} cpu {r[n + '_cpu']:.1f} s/1000 rss {r[n + '_rss']:.0f} MiB" for n in nodes)
        print(f"round {rnd + 1} (load {r['load']:.1f}): {each}  Orthanc {r['orthanc']:6.1f}/s rss {r['orthanc_rss']:.0f} MiB  ceiling {r['ceiling']:6.1f}/s", flush=True)
    if not results:
        raise SystemExit(f"load {name}: no round was counted")
    med = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
    for n in nodes:
        ratios = [r[n] / r["orthanc"] for r in results]
        print(f"{name}: {label[n]}: median {med(n):.1f}/s, Orthanc {med('orthanc'):.1f}/s, ceiling {med('ceiling'):.1f}/s; "
              f"ratio to Orthanc median {statistics.median(ratios):.2f}, spread {min(ratios):.2f}-{max(ratios):.2f}; "
              f"cpu median {med(n + '_cpu'):.1f} s per 1000 objects; peak RSS max {max(r[n + '_rss'] for r in results):.0f} MiB", flush=True)
    return results


# -- one big object --------------------------------------------------------------------------
def write_big_object(path: Path, mib: int) -> None:
    """A CT object whose Pixel Data is ``mib`` MiB of zeros, written in pieces (the bench
    never holds it in memory)."""
    import struct

    from pydicom import dcmread

    src = make_study(path.parent / "big-src", 1)[0]
    ds = dcmread(src)
    del ds.PixelData
    n = mib * 1024 * 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Columns = 16384
    ds.Rows = n // 2 // 16384
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as fp:
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, ds.Rows * ds.Columns * 2))
        block = bytes(8 * 1024 * 1024)
        left = ds.Rows * ds.Columns * 2
        while left:
            fp.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def big_object(work: Path, mib: int, node_kw: dict) -> None:
    big = work / "big" / "big.dcm"
    big.parent.mkdir(parents=True, exist_ok=True)
    write_big_object(big, mib)
    node, raw = start_node(work, "big", max_object_mb=mib + 64, **node_kw)
    try:
        pid = node.proc.pid  # type: ignore[union-attr]
        time.sleep(1.0)
        base = rss_mib(pid)
        peak, stop = [base], threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak.append(rss_mib(pid))

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        dt = send(raw["node"]["port"], [big.parent], "CASEMASK")
        stop.set()
        t.join()
        stored = node_rows(Path(raw["node"]["data_dir"]))
    finally:
        node.stop()
    grown = max(peak) - base
    print(f"\n== one {mib} MiB object: stored {stored}, {dt:.1f} s; node RSS {base:.0f} MiB before, peak {max(peak):.0f} MiB while receiving: grew {grown:.0f} MiB (target < 300)", flush=True)
    shutil.rmtree(work / "big", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", default="single,concurrent", help="comma-separated: single, concurrent")
    ap.add_argument("--instances", type=int, default=1000, help="objects the single sender sends")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--per-sender", type=int, default=250)
    ap.add_argument("--big-mb", type=int, default=1024, help="size of the one big object (0: skip that check)")
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE", help="a [node] setting (an integer, or true/false) for the node under test, e.g. --node max_associations=64 (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE", help="a second node in every round with these [node] settings on top of --node's, e.g. --variant receivers=1 or --variant parallel_durability=false (repeatable)")
    ap.add_argument("--null-scp", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.null_scp:
        return null_scp(args.null_scp)
    if STORESCU is None:
        raise SystemExit("dcmtk's storescu is not installed (apt-get install -y dcmtk)")
    node_kw = {k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.node)}
    variant_kw = {k: _setting(v) for k, v in (kv.split("=", 1) for kv in args.variant)}
    work = Path(tempfile.mkdtemp(prefix="casemask-bench-ingest-"))
    try:
        loads = [x.strip() for x in args.loads.split(",") if x.strip()]
        print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; sender: dcmtk storescu, TCP_NODELAY=1; node settings: {node_kw or 'defaults'}; variant: {variant_kw or 'none'}")
        if "single" in loads:
            corpus = work / "single"
            make_study(corpus, args.instances)
            kb = sum(p.stat().st_size for p in corpus.iterdir()) / args.instances / 1024
            print(f"corpus single: {args.instances} CT instances of one study, {kb:.0f} KB each")
            run_load(work, "single", [corpus], args.instances, args.rounds, node_kw, variant_kw)
        if "concurrent" in loads:
            corpora = [work / f"concurrent{s}" for s in range(args.senders)]
            for c in corpora:
                make_study(c, args.per_sender)
            run_load(work, "concurrent", corpora, args.senders * args.per_sender, args.rounds, node_kw, variant_kw)
        if args.big_mb:
            big_object(work, args.big_mb, node_kw)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Header de-identification: `casemask deid` (with its verifier, always on) vs dicognito
and dcmanon (a Rust core), whole commands, same files.

    python tests/bench/bench_deid.py [--series 500] [--rounds 3]

Corpora: pydicom's CT_small, MR_small and rtplan (each copied 200 times with new UIDs, so
start-up does not dominate), and a 500-instance CT series. Each round runs the three tools
on each corpus, in a rotating order, into fresh output folders. Prints instances/s for
each tool and the ratios casemask/dicognito (target: >= 3x) and casemask/dcmanon (the
bar to approach), medians over rounds. dcmanon has no command: a three-line driver
reads each file, anonymizes it with its default profile and writes it, in one process
(as dicognito runs). All start from compiled bytecode (see below), as installed programs do.
Each line also gives the CPU seconds (user + sys, the command and its worker processes,
median over rounds) of casemask and dicognito: on a shared machine they move much less
with the load than the wall-clock rates do (docs/deid.md).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.conftest import PYDICOM_FILES, make_study  # noqa: E402

BIN = Path(sys.executable).parent
DCMANON = (
    "import sys, pathlib, dcmanon\n"
    "a = dcmanon.Anonymizer(); out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)\n"
    "for k, f in enumerate(sorted(pathlib.Path(sys.argv[1]).glob('*.dcm'))): (out / f'{k:05d}.dcm').write_bytes(a.anonymize(str(f)))\n"
)


def copies(src: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    base = dcmread(src)
    for k in range(n):
        ds = base.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the children it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr[-800:]}")
    return dt, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=500)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        import dcmanon  # noqa: F401
        import dicognito  # noqa: F401
    except ImportError:
        raise SystemExit("dicognito or dcmanon is not installed (pip install dicognito dcmanon)") from None
    # Both commands start from bytecode: dicognito's was compiled when pip installed it;
    # casemask's (an editable install) is brought up to date here, in case the sources
    # changed since `make venv` and PYTHONDONTWRITEBYTECODE keeps Python from caching it.
    import compileall

    for pkg in ("node", "engine"):
        compileall.compile_dir(ROOT / pkg, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="casemask-bench-deid-"))
    corpora = {
        "CT_small": copies(PYDICOM_FILES / "CT_small.dcm", work / "ct_small", args.copies),
        "MR_small": copies(PYDICOM_FILES / "MR_small.dcm", work / "mr_small", args.copies),
        "rtplan": copies(PYDICOM_FILES / "rtplan.dcm", work / "rtplan", args.copies),
        f"CT series x{args.series}": make_study(work / "series", args.series)[0].parent,
    }
    secret = work / "secret.key"
    ratios, ratios_rust = [], []
    try:
        for name, folder in corpora.items():
            n = len(list(folder.glob("*.dcm")))
            speed: dict[str, list[float]] = {"casemask": [], "dicognito": [], "dcmanon": []}
            cpu: dict[str, list[float]] = {tool: [] for tool in speed}
            for rnd in range(args.rounds):
                outs = {tool: work / f"{tool}{rnd}-{name[:6]}" for tool in speed}
                commands = {
                    "casemask": [str(BIN / "casemask"), "deid", str(folder), "--out", str(outs["casemask"]), "--secret", str(secret), "--option", "retain-longitudinal-modified-dates"],
                    # dicognito 0.19's console script is broken; its module entry point works.
                    "dicognito": [sys.executable, "-m", "dicognito", "--quiet", "--output-directory", str(outs["dicognito"]), str(folder)],
                    "dcmanon": [sys.executable, "-c", DCMANON, str(folder), str(outs["dcmanon"])],
                }
                order = list(commands)
                order = order[rnd % 3 :] + order[: rnd % 3]
                for tool in order:
                    wall, used = run(commands[tool])
                    speed[tool].append(n / wall)
                    cpu[tool].append(used)
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
            a, b, c = (statistics.median(speed[t]) for t in ("casemask", "dicognito", "dcmanon"))
            ratios.append(a / b)
            ratios_rust.append(a / c)
            ca, cb = statistics.median(cpu["casemask"]), statistics.median(cpu["dicognito"])
            print(
                f"{name:<16} {n:4d} files: casemask {a:7.1f}/s  dicognito {b:7.1f}/s  dcmanon {c:7.1f}/s  casemask/dicognito {a / b:5.2f}  casemask/dcmanon {a / c:5.2f}"
                f"  | CPU s: casemask {ca:5.2f}  dicognito {cb:5.2f}  dicognito/casemask {cb / ca:5.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"median ratio casemask/dicognito over corpora: {statistics.median(ratios):.2f} (target >= 3)")
    print(f"median ratio casemask/dcmanon over corpora: {statistics.median(ratios_rust):.2f} (the bar to approach: 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

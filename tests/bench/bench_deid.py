"""Header de-identification: `casemask deid` vs dicognito, whole commands, same files.

    python tests/bench/bench_deid.py [--series 500] [--rounds 3]

Corpora: pydicom's CT_small, MR_small and rtplan (each copied 200 times with new UIDs, so
start-up does not dominate), and a 500-instance CT series. Each round runs both tools on
each corpus, alternating which goes first, into fresh output folders. Prints instances/s
for each tool and the ratio casemask/dicognito (median over rounds). Target: >= 3x.
Both tools start from compiled bytecode (see below), as installed programs do.
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

from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.conftest import PYDICOM_FILES, make_study  # noqa: E402

BIN = Path(sys.executable).parent


def copies(src: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    base = dcmread(src)
    for k in range(n):
        ds = base.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr[-800:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=500)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        import dicognito  # noqa: F401
    except ImportError:
        raise SystemExit("dicognito is not installed (pip install dicognito)") from None
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
    ratios = []
    try:
        for name, folder in corpora.items():
            n = len(list(folder.glob("*.dcm")))
            ours, theirs = [], []
            for rnd in range(args.rounds):
                out_a, out_b = work / f"a{rnd}-{name[:6]}", work / f"b{rnd}-{name[:6]}"
                cm = [str(BIN / "casemask"), "deid", str(folder), "--out", str(out_a), "--secret", str(secret), "--option", "retain-longitudinal-modified-dates"]
                # dicognito 0.19's console script is broken; its module entry point works.
                dg = [sys.executable, "-m", "dicognito", "--quiet", "--output-directory", str(out_b), str(folder)]
                order = [("casemask", cm), ("dicognito", dg)]
                if rnd % 2:
                    order.reverse()
                for tool, cmd in order:
                    dt = run(cmd)
                    (ours if tool == "casemask" else theirs).append(n / dt)
                shutil.rmtree(out_a, ignore_errors=True)
                shutil.rmtree(out_b, ignore_errors=True)
            a, b = statistics.median(ours), statistics.median(theirs)
            ratios.append(a / b)
            print(f"{name:<16} {n:4d} files: casemask {a:7.1f}/s  dicognito {b:7.1f}/s  ratio {a / b:5.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"median ratio casemask/dicognito over corpora: {statistics.median(ratios):.2f} (target >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

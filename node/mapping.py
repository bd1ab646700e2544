"""The pseudonym mapping an honest broker needs (the key that re-identifies patients).

``uids.csv``: level, output kind, original UID, output UID (then every other replaced
UID); ``patients.csv``: issuer, Patient ID, Patient's Name -> pseudonymous ID and name,
and the date offset in days. Built from the ``pseudonyms`` table that the pipeline
fills; written owner-only (folder 0700, files 0600). :class:`node.service.Service` writes
it for ``casemask export-mapping`` and zips it for the API, auditing both.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import Pseudonym

UIDS_HEADER = ["level", "output_kind", "id_old", "id_new"]
PATIENTS_HEADER = ["issuer", "patient_id", "patient_name", "patient_id_new", "patient_name_new", "date_offset_days"]


class MappingError(ValueError):
    """The mapping cannot be written there (the message says what to do)."""


def tables(session: Session) -> dict[str, tuple[list[str], list[list[str]]]]:
    """File name -> (header, rows) of the whole mapping."""
    rows = session.execute(select(Pseudonym.kind, Pseudonym.old, Pseudonym.new).order_by(Pseudonym.id)).all()
    return {"uids.csv": (UIDS_HEADER, uid_rows(rows)), "patients.csv": (PATIENTS_HEADER, patient_rows(rows))}


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def uid_rows(rows) -> list[list[str]]:
    from node.pipeline import LEVEL_KINDS, OUTPUT_KINDS

    levels = {v: k for k, v in LEVEL_KINDS.items()}
    kinds = {v: k for k, v in OUTPUT_KINDS.items()}
    out = []
    for kind, old, new in rows:
        if "/" in kind:
            level, short = kind.split("/", 1)
            out.append([levels.get(level, level), kinds.get(short, short), old, new])
    out += [["reference", "", old, new] for kind, old, new in rows if kind == "uid"]
    return out


def patient_rows(rows) -> list[list[str]]:
    ids = {old: new for kind, old, new in rows if kind == "patient"}
    offsets = {old: new for kind, old, new in rows if kind == "date-offset"}
    names: dict[str, list[tuple[str, str]]] = {}
    for kind, old, new in rows:
        if kind == "patient-name":
            issuer, pid, name = json.loads(old)
            names.setdefault(json.dumps([issuer, pid]), []).append((name, new))
    out = []
    for who, new_id in ids.items():
        issuer, pid = json.loads(who)
        for name, new_name in names.get(who, [("", "")]):
            out.append([issuer, pid, name, new_id, new_name, offsets.get(who, "")])
    return out


def private_folder(path: Path) -> Path:
    """A folder only its owner can enter: made 0700, or an existing one that already is.

    Raises:
        MappingError: the folder exists and others can read it.
    """
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # whatever the umask
    elif path.stat().st_mode & 0o077:
        raise MappingError(f"{path} can be read by others: give a new folder, or chmod 700 {path}")
    return path


def write_private_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)

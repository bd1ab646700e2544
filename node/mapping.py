"""The pseudonym mapping an honest broker needs (the key that re-identifies patients).

``uids.csv``: level, output kind, original UID, output UID (then every other replaced
UID); ``patients.csv``: issuer, Patient ID, Patient's Name -> pseudonymous ID and name,
and the date offset in days. Built from the ``pseudonyms`` table that the pipeline
fills; written owner-only (folder 0700, files 0600). :class:`node.service.Service` writes
it for ``casemask export-mapping`` and zips it for the API, auditing both.

The table holds original Patient IDs, Patient's Names and UIDs in clear, so it is
bounded by ``[retention] mapping_days``: each row carries ``seen_at`` (when it was written
or last met again, refreshed at most once per :data:`REFRESH_AFTER`), and retention
deletes the rows not met for that many days (:func:`expire`). ``mapping_days = 0``
stores none (:func:`save` is then not called). Pseudonyms are keyed hashes of the
originals: deleting a row changes no output, it only leaves it out of the export.

The values come from senders (Patient ID, Patient's Name), and the files are often
opened in a spreadsheet, which runs a cell that begins with ``=``, ``+``, ``-`` or ``@``
as a formula (OWASP, "CSV Injection"). A value that begins with one of those (or their
fullwidth forms; after leading spaces, control or invisible characters too), with a
control character (tab, carriage return, line feed, NUL) or a single quote is written
with one more single quote in front (:func:`csv_cell`), whole numbers excepted; a
program reading the files drops a leading single quote to get the value back. No other
value changes.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import unicodedata
from pathlib import Path

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from node.db import Pseudonym, db_now

# A row met again is given a new ``seen_at`` only when its own is older than this: most
# batches then write no row they did not add (pseudonyms of one patient recur).
REFRESH_AFTER = dt.timedelta(days=1)

UIDS_HEADER = ["level", "output_kind", "id_old", "id_new"]
PATIENTS_HEADER = ["issuer", "patient_id", "patient_name", "patient_id_new", "patient_name_new", "date_offset_days"]


class MappingError(ValueError):
    """The mapping cannot be written there (the message says what to do)."""


def tables(session: Session) -> dict[str, tuple[list[str], list[list[str]]]]:
    """File name -> (header, rows) of the whole mapping."""
    rows = session.execute(select(Pseudonym.kind, Pseudonym.old, Pseudonym.new).order_by(Pseudonym.id)).all()
    return {"uids.csv": (UIDS_HEADER, uid_rows(rows)), "patients.csv": (PATIENTS_HEADER, patient_rows(rows))}


def save(session: Session, rows: list[dict[str, str]]) -> None:
    """Store mappings (dicts of ``kind``, ``old``, ``new``) in the caller's transaction:
    a new (kind, old) is inserted with ``seen_at`` = now (database time), one already
    stored keeps its ``new`` (pseudonyms are stable, so a later one is the same) and has
    its ``seen_at`` moved to now when older than :data:`REFRESH_AFTER`, so that a patient
    who comes back keeps the rows an export needs. ``ON CONFLICT``: workers that meet the
    same patient at once do not fail on the unique constraint. Rows are written in key
    order, so that two such transactions on PostgreSQL wait for each other rather than
    deadlock."""
    if not rows:
        return
    now = db_now(session)
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    t = Pseudonym.__table__
    stmt = dialect_insert(t)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.kind, t.c.old],
        set_={"seen_at": stmt.excluded.seen_at},
        where=or_(t.c.seen_at.is_(None), t.c.seen_at < now - REFRESH_AFTER),
    )
    session.execute(stmt, [{**r, "seen_at": now} for r in sorted(rows, key=lambda r: (r["kind"], r["old"]))])


def due(session: Session, cutoff: dt.datetime) -> int:
    """How many rows were last met at or before ``cutoff`` (or never dated)."""
    return int(session.scalar(select(func.count()).select_from(Pseudonym).where(_stale(cutoff))) or 0)


def expire(session: Session, cutoff: dt.datetime, limit: int = 5000) -> int:
    """Delete up to ``limit`` rows last met at or before ``cutoff`` (rows never dated
    too), in the caller's transaction; returns how many."""
    ids = list(session.scalars(select(Pseudonym.id).where(_stale(cutoff)).order_by(Pseudonym.id).limit(limit)))
    if not ids:
        return 0
    session.execute(delete(Pseudonym).where(Pseudonym.id.in_(ids)).execution_options(synchronize_session=False))
    return len(ids)


def _stale(cutoff: dt.datetime):
    return or_(Pseudonym.seen_at.is_(None), Pseudonym.seen_at <= cutoff)


_FORMULA_STARTS = ("=", "+", "-", "@", "\uff1d", "\uff0b", "\uff0d", "\uff20")  # and their fullwidth forms
_NUMBER = re.compile(r"[-+]?[0-9]+")  # a date offset: a spreadsheet reads it as the number it is


def csv_cell(value: str) -> str:
    """``value`` as written into the mapping's CSV files: a single quote in front of one
    that a spreadsheet would read as a formula, or that begins with a single quote
    itself (so that dropping one leading quote always gives the value back); a whole
    number (``-123``, the date offset) stays as it is. A formula character counts after
    any leading spaces, control characters (tab, carriage return, line feed, NUL) or
    invisible format characters (zero-width space, byte order mark), which some
    spreadsheets drop or trim before they look; a value beginning with a control
    character is quoted whatever follows. Sources: OWASP, "CSV Injection"; OWASP ASVS
    5.0 1.2.10."""
    if _NUMBER.fullmatch(value):
        return value
    if value.startswith("'") or (value and unicodedata.category(value[0]) == "Cc"):
        return "'" + value
    start = next((c for c in value if not (c.isspace() or unicodedata.category(c) in ("Cc", "Cf"))), "")
    if start and start in _FORMULA_STARTS:
        return "'" + value
    return value


def _write_rows(fh, header: list[str], rows: list[list[str]]) -> None:
    w = csv.writer(fh)
    w.writerow(header)
    w.writerows([csv_cell(str(v)) for v in row] for row in rows)


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """The CSV file of ``rows`` under ``header`` (values through :func:`csv_cell`)."""
    buf = io.StringIO()
    _write_rows(buf, header, rows)
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


def refuse_existing(folder: Path, names: list[str]) -> None:
    """Refuse to write over an earlier export (it may be the only copy of a mapping
    that retention has since aged out).

    Raises:
        MappingError: one of ``names`` already exists in ``folder``.
    """
    there = [name for name in names if (folder / name).exists()]
    if there:
        raise MappingError(f"{folder} already holds {' and '.join(there)} (an earlier export): give a new folder, or --force to overwrite")


def write_private_csv(path: Path, header: list[str], rows: list[list[str]], overwrite: bool = True) -> None:
    """Write one CSV file owner-only (0600), values through :func:`csv_cell`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL), 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        _write_rows(fh, header, rows)

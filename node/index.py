"""The index of similar cases: the medical vectors of a route's anonymized outputs.

For every anonymized output of a route with ``index = true`` the pipeline calls
:meth:`Indexer.add` after the output is in the outbox: the output's pixels go through the
pixel step's preprocessing (``node.pixels``) and the route's model, and one
:class:`node.db.IndexEntry` per frame keeps the *medical* vector of that anonymized image,
the disease probabilities the model gives it, its pseudonymous UIDs, the destinations it
goes to and the model's name and weights digest. Never the identity vector (it is not
read), never the original pixels (only the output, after the pixel and header steps),
never a query (``node.similar`` reads the index, it never writes it).

After a model change the vectors of the old weights are in another space: searches skip
them (:func:`load_case_base` takes one weights digest), and :func:`rebuild`
(``casemask index rebuild``) encodes the outputs again with the current model, reading
each from the outbox when the file is still there (exactly the bytes the node sent),
else from a folder destination's copy; a file that retention deleted from the outbox and
that no folder destination holds cannot be read back (DICOM and DICOMweb destinations are
not fetched from), and its stale entries are removed.

The disease probabilities are those of the medical vector (``engine.retrieval.
softmax_distance`` to the class prototypes the bundle ships): the bundle carries no
disease head, and the prototypes are what the pixel step already uses to name a class.
Needs NumPy and the engine's runtime API only (no PyTorch of its own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine.retrieval import CaseBase, softmax_distance
from node import queue
from node.config import Route, Settings
from node.db import IndexEntry, Job, JobState, Output, data_path
from node.pixels import PixelError, frames_of, mapping_for, to_model_batch
from node.spool import digest
from node.wire import peek_str

if TYPE_CHECKING:
    from engine.api import Model

log = logging.getLogger(__name__)

INDEXED_KIND = "anonymized"  # counterfactuals show a disease the patient does not have: never cases


def model_input(ds: Dataset, size: int) -> np.ndarray:
    """Every frame of ``ds`` as the model sees it, (frames, 1, size, size) float32 in
    [-1, 1]: the pixel step's own preprocessing (decode, Modality LUT, window,
    MONOCHROME1 inverted, aspect-preserving resize and pad).

    Raises:
        PixelError: the pixels cannot go through the model (photometric
            interpretation, samples, undecodable data).
    """
    frames = frames_of(ds)
    maps = [mapping_for(frame, ds, size) for frame in frames]
    return to_model_batch(list(frames), maps, size)[:, None]


def check_modality(ds: Dataset, model: Model) -> None:
    """Raises PixelError when ``ds``'s modality is not one the model was trained for (as
    the pixel step refuses it)."""
    modalities = set(model.bundle.meta.get("modalities", ["CR", "DX"]))
    mod = peek_str(ds, "Modality")
    if mod not in modalities:
        raise PixelError(f"modality {mod or '(absent)'} is not one the model was trained for ({', '.join(sorted(modalities))})")


def describe(model: Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(medical vectors (N, med_dim), disease probabilities (N, classes)) of model inputs
    ``x`` (N, 1, S, S). The identity and other vectors the encoder also returns are
    dropped here."""
    medical = np.asarray(model.encode(x)[0], np.float32)
    prototypes = np.asarray(model.bundle.meta["prototypes"], np.float32)
    return medical, softmax_distance(medical, prototypes)


def model_loader(settings: Settings) -> Callable[[str], Model]:
    """``load(name)``: the ``[[models]]`` entry ``name`` loaded as the pixel step loads it.

    Raises (from the returned function):
        KeyError: no such model; engine.bundle.BundleError, engine.runtime.RunnerError.
    """

    def load(name: str) -> Model:
        from engine import load_model

        ms = settings.model(name)
        return load_model(ms.path, backend=ms.backend, max_batch=ms.batch_size, spin=False)

    return load


def weights_of(model: Model) -> str:
    return model.bundle.weights_digest()


def entries_for(ds: Dataset, model: Model, model_name: str, route: Route, output_id: int | None) -> list[IndexEntry]:
    """The index entries (one per frame) of an anonymized output ``ds``.

    Raises:
        PixelError: its pixels cannot go through the model.
    """
    medical, probs = describe(model, model_input(ds, model.image_size))
    uids = {kw: peek_str(ds, kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return [
        IndexEntry(output_id=output_id, route=route.name, frame=f, study_uid=uids["StudyInstanceUID"], series_uid=uids["SeriesInstanceUID"],
                   sop_uid=uids["SOPInstanceUID"], label=int(probs[f].argmax()), probabilities=probs[f].tobytes(), medical=medical[f].tobytes(),
                   model=model_name, weights=weights_of(model), destinations=json.dumps(list(route.destinations)))
        for f in range(len(medical))
    ]


class Indexer:
    """The pipeline's index hook. ``model_for(name)``: the loaded model of a ``[[models]]``
    entry (the pixel step's), or None when it is not loaded."""

    def __init__(self, model_for: Callable[[str], Model | None]) -> None:
        self.model_for = model_for

    def add(self, session: Session, route: Route, job: Job, made: Iterable[tuple[str, Dataset, Output]]) -> None:
        """Index the anonymized outputs ``made`` ((kind, dataset, output row)) of one job.

        A failure here never holds back the outputs (they are de-identified and queued
        already): it is logged and put in the job's record ("index"), and ``casemask
        index rebuild`` adds what is missing.
        """
        wanted = [(ds, out) for kind, ds, out in made if kind == INDEXED_KIND]
        if not wanted:
            return
        model = self.model_for(route.model)
        if model is None:
            queue.note_job(job, "index", {"indexed": 0, "reason": f"model {route.model!r} is not loaded"})
            return
        try:
            with session.begin_nested():
                rows = [e for ds, out in wanted for e in entries_for(ds, model, route.model, route, out.id)]
                session.add_all(rows)
        except Exception as exc:  # noqa: BLE001 - recorded in the job, never silent
            reason = f"not indexed ({type(exc).__name__}: {exc}); casemask index rebuild adds it"
            log.error("job %d (route %s): %s", job.id, route.name, reason)
            queue.note_job(job, "index", {"indexed": 0, "reason": reason})
            return
        queue.note_job(job, "index", {"indexed": len(rows), "model": route.model, "weights": weights_of(model)})


# -- reading the index ----------------------------------------------------------------------
@dataclasses.dataclass
class Cases:
    """The entries of one model's weights, searchable: row ``i`` of ``base`` is the entry
    with id ``ids[i]`` (fetch the rest of an entry for the hits only: :func:`entries`)."""

    base: CaseBase
    ids: np.ndarray  # (N,) IndexEntry ids


def load_case_base(session: Session, model_name: str, weights: str, approximate: str = "never") -> Cases:
    """Every entry of ``model_name`` made by ``weights``, as a :class:`Cases`. Reads only
    the id, label and medical vector of each (10^5 entries: see docs/retrieval.md)."""
    rows = session.execute(select(IndexEntry.id, IndexEntry.label, IndexEntry.medical)
                           .where(IndexEntry.model == model_name, IndexEntry.weights == weights).order_by(IndexEntry.id)).all()
    n = len(rows)
    ids = np.fromiter((r[0] for r in rows), np.int64, n)
    labels = np.fromiter((r[1] for r in rows), np.int64, n)
    medical = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(n, -1) if n else np.zeros((0, 1), np.float32)
    return Cases(CaseBase(medical, labels, approximate=approximate), ids)


def entries(session: Session, ids: Iterable[int]) -> dict[int, IndexEntry]:
    """The index entries with these ids."""
    wanted = sorted({int(i) for i in ids})
    return {e.id: e for e in session.scalars(select(IndexEntry).where(IndexEntry.id.in_(wanted)))} if wanted else {}


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Entries per (model name, weights digest)."""
    from sqlalchemy import func

    rows = session.execute(select(IndexEntry.model, IndexEntry.weights, func.count()).group_by(IndexEntry.model, IndexEntry.weights))
    return {(m, w): n for m, w, n in rows}


# -- rebuilding -------------------------------------------------------------------------------
@dataclasses.dataclass
class RebuildReport:
    """What :func:`rebuild` did, per route."""

    route: str
    model: str
    weights: str
    current: int = 0  # entries already made by these weights: left as they are
    from_outbox: int = 0  # outputs read from the outbox and indexed again
    from_folder: int = 0  # outputs read from a folder destination's copy
    gone: int = 0  # outputs whose file is nowhere the node can read: their stale entries removed
    unreadable: int = 0  # files found that the model cannot take (PixelError)
    removed: int = 0  # stale entries removed (of other weights, for outputs re-indexed or gone)

    def line(self) -> str:
        return (f"route {self.route} (model {self.model}, weights {self.weights}): {self.current} current, "
                f"{self.from_outbox} re-indexed from the outbox, {self.from_folder} from a folder destination, "
                f"{self.gone} gone (not in the outbox, no folder destination holds them), {self.unreadable} unreadable; "
                f"{self.removed} stale entries removed")


def _folder_files(settings: Settings, route: Route) -> dict[str, Path]:
    """Digest of the SOP Instance UID -> file, in every folder destination of ``route``
    (``node.scu.FolderSender`` writes ``path/<study>/<series>/<instance>.dcm``, each
    named by its UID's digest: ``node.spool.folder_path``)."""
    found: dict[str, Path] = {}
    for name in route.destinations:
        dest = settings.destination(name)
        if dest.kind == "folder" and dest.path is not None and Path(dest.path).is_dir():
            for p in Path(dest.path).glob("*/*/*.dcm"):
                found.setdefault(p.stem, p)
    return found


def _read(path: Path, sop_uid: str) -> Dataset | None:
    """The dataset at ``path`` when it is the output ``sop_uid``; None otherwise."""
    try:
        ds = dcmread(path)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("index rebuild: %s unreadable (%s)", path.name, type(exc).__name__)
        return None
    return ds if peek_str(ds, "SOPInstanceUID") == sop_uid else None


def rebuild(settings: Settings, sessions: sessionmaker, load: Callable[[str], Model], routes: list[str] | None = None,
            force: bool = False, on_progress: Callable[[int, int], None] | None = None) -> list[RebuildReport]:
    """Index again every anonymized output of the routes with ``index = true`` (or those
    named in ``routes``) with each route's current model (``load(model name)``).

    Outputs already indexed by the current weights are left alone unless ``force``. For
    the others the file is read from the outbox if it is still there, else from a folder
    destination's copy; entries of other weights are replaced, or removed when the file
    is gone.

    Raises:
        KeyError: a route named in ``routes`` is not configured.
        ValueError: a route named in ``routes`` has ``index = false``.
    """
    chosen = [settings.route(n) for n in routes] if routes else [r for r in settings.routes if r.index]
    for r in chosen:
        if not r.index:
            raise ValueError(f"route {r.name!r} has index = false: nothing of it is indexed")
    reports = []
    for route in chosen:
        model = load(route.model)
        rep = RebuildReport(route.name, route.model, weights_of(model))
        folders = _folder_files(settings, route)
        with sessions() as session:
            outputs = list(session.scalars(
                select(Output).join(Job, Job.id == Output.job_id)
                .where(Job.route == route.name, Job.state == JobState.DONE, Output.kind == INDEXED_KIND).order_by(Output.id)))
            for k, out in enumerate(outputs):
                _rebuild_one(session, settings, route, model, out, folders, rep, force)
                if k % 100 == 99:
                    session.commit()
                    if on_progress:
                        on_progress(k + 1, len(outputs))
            session.commit()
        log.info("index rebuild: %s", rep.line())
        reports.append(rep)
    return reports


def _rebuild_one(session: Session, settings: Settings, route: Route, model: Model, out: Output, folders: dict[str, Path], rep: RebuildReport, force: bool) -> None:
    old = list(session.scalars(select(IndexEntry).where(IndexEntry.output_id == out.id)))
    stale = [e for e in old if e.weights != rep.weights or e.model != route.model]
    if old and not stale and not force:
        rep.current += 1
        return
    ds, where = None, ""
    outbox = data_path(settings.node.data_dir, out.path)
    if outbox.is_file():
        ds, where = _read(outbox, out.sop_instance_uid), "outbox"
    copy = folders.get(digest(out.sop_instance_uid))
    if ds is None and copy is not None:
        ds, where = _read(copy, out.sop_instance_uid), "folder"
    new: list[IndexEntry] = []
    if ds is None:
        rep.gone += 1
    else:
        try:
            new = entries_for(ds, model, route.model, route, out.id)
        except PixelError as exc:
            log.warning("index rebuild: output %d: %s", out.id, exc)
            rep.unreadable += 1
    if not new:  # nothing to put in their place: only the stale entries go
        for e in stale:
            session.delete(e)
        rep.removed += len(stale)
        return
    for e in old:
        session.delete(e)
    session.flush()
    session.add_all(new)
    rep.removed += len(stale)
    if where == "outbox":
        rep.from_outbox += 1
    else:
        rep.from_folder += 1

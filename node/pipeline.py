"""One study through one route: pixel step, header step, outbox, deliveries.

Fail closed: a step that the route requires and that decides against an object, raises
on it, or is not available, quarantines the object with the reason, and nothing of it
reaches the outbox. With ``partial = "quarantine-study"`` (the default) one quarantined
object quarantines the rest of its study in the batch as well.

Failures of a whole batch are tries, not verdicts (node.queue): a step that raises for
the batch, or the pipeline itself, costs every job of it one try (``max_job_attempts``
then quarantines; the last try runs alone, so an object that breaks its batch takes no
other object down with it); a backend out of reach (``TransientRunnerError``), the
database busy, or an outbox that cannot be written, puts the jobs off with a backoff
and costs no try. Reasons name the step, the error's class and the attribute, never a
value (node.reasons). The batch's lease is renewed while it runs, and every finish is
guarded: a worker that lost its lease drops its result.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node import audit, mapping, metrics, queue
from node.config import Route, Settings
from node.db import Job, Output, data_path, row_path
from node.deid import Deidentifier, Pseudonymizer, QuarantineError, Result, to_bytes
from node.deid.profile import CLEAN_PIXEL_CODE, CLEAN_VISUAL_CODE
from node.deid.verify import Policy, VerifyError, reason, verify
from node.leases import LeaseKeeper
from node.reasons import describe, location, scrub
from node.spool import outbox_path, write_atomic

if TYPE_CHECKING:
    from node.index import Indexer

log = logging.getLogger(__name__)


AUTHORED = {
    "anonymized": ("DerivationDescription", "ImageType", "BurnedInAnnotation", "RecognizableVisualFeatures"),
    "counterfactual": ("DerivationDescription", "ImageType", "BurnedInAnnotation", "RecognizableVisualFeatures", "SeriesDescription"),
}


@dataclasses.dataclass
class Item:
    """One object on its way through a route's steps."""

    job: Job
    source: Dataset | None = None
    outputs: list[tuple[str, Dataset]] = dataclasses.field(default_factory=list)  # (kind, dataset)
    error: str = ""
    original: bytes = b""  # the spooled file, for the verifier
    encoded: list[bytes] = dataclasses.field(default_factory=list)  # the outputs' bytes, once verified
    pixels_cleaned: bool = False  # burned-in text masked by node.burnedin
    notes: dict[str, object] = dataclasses.field(default_factory=dict)  # step -> what it found (job record; no PHI)


class BatchError(Exception):
    """A step failed for a whole batch (as opposed to a verdict on one object)."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(step)
        self.step = step
        self.cause = cause


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says something needed is out of reach for
    now: an inference backend (``engine.runtime.TransientRunnerError``) or the database
    (SQLAlchemy's ``OperationalError``: locked, connection lost)."""
    from engine.runtime.base import TransientRunnerError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (TransientRunnerError, OperationalError)):
            return True
        e = e.cause if isinstance(e, BatchError) else (e.__cause__ or e.__context__)
    return False


class PixelStep(Protocol):
    """What the pixel anonymization step offers the pipeline (see node.pixels)."""

    def available(self, route: Route) -> str | None:
        """None when the route's model is ready; else why not."""

    def process(self, items: list[Item], route: Route, pseudo: Pseudonymizer) -> None:
        """Fill each item's ``outputs`` with derived datasets, or set its ``error``; put
        what the gates found in its ``notes`` (kept in the job record either way)."""


class Pipeline:
    """Claims batches of jobs (as ``owner``) and takes them through their route."""

    def __init__(self, settings: Settings, sessions: sessionmaker, pseudo: Pseudonymizer, pixel_step: PixelStep | None = None, owner: str = "local/0",
                 indexer: Indexer | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.pseudo = pseudo
        self.pixel_step = pixel_step
        self.owner = owner
        self.indexer = indexer  # node.index: medical vectors of anonymized outputs (routes with index = true)
        self.data_dir = settings.node.data_dir
        self.outbox = settings.node.data_dir / "outbox"
        self._deid: dict[str, Deidentifier] = {}
        self._burned_in = None  # node.burnedin.BurnedInStep, made for the first route that cleans

    def deidentifier(self, route: Route) -> Deidentifier:
        if route.name not in self._deid:
            assert route.deid is not None
            self._deid[route.name] = Deidentifier(route.deid, self.pseudo, pixels_cleaned=route.pixels == "anonymize")
        return self._deid[route.name]

    def run_once(self) -> int:
        """Claim one batch of jobs (whole studies, one route) and process it; returns its
        size. The lease is renewed in the background while the batch runs."""
        node = self.settings.node
        with self.sessions() as session:
            jobs = queue.claim_jobs(session, self.owner, node.lease_s, node.max_job_attempts)
            session.commit()
            if not jobs:
                return 0
            ids = [j.id for j in jobs]
            route = jobs[0].route
            written: dict[int, list[Path]] = {}
            failure: Exception | None = None
            with LeaseKeeper(self.sessions, lambda s: queue.renew_jobs(s, self.owner, ids, node.lease_s), len(ids), node.lease_s / 3) as keeper:
                try:
                    self.process(session, jobs, written, before_finish=keeper.stop)
                    session.commit()
                except Exception as exc:
                    session.rollback()
                    failure = exc
            if failure is not None:
                self._batch_failed(session, route, ids, failure, written)
                session.commit()
            return len(jobs)

    def _batch_failed(self, session: Session, route: str, ids: list[int], exc: Exception, written: dict[int, list[Path]]) -> None:
        """Every job of a failed batch that is still this worker's: put off (transient,
        not counted) or one try used up (quarantined when it was the last)."""
        node = self.settings.node
        step, cause = (exc.step, exc.cause) if isinstance(exc, BatchError) else ("pipeline", exc)
        reason = describe(step, cause)
        jobs = list(session.scalars(select(Job).where(Job.id.in_(ids)).execution_options(populate_existing=True)))
        if is_transient(exc):
            delays = {job.id: d for job in jobs if (d := queue.defer_job(session, job, self.owner, f"{reason} (out of reach; not counted as a try)", node.retry_base_s, node.retry_max_s)) is not None}
            _remove_written(written, list(delays))
            log.warning("route %s: %s: %d jobs put off for %.1f s (not counted as tries)", route, reason, len(delays), max(delays.values(), default=0.0))
            return
        log.error("route %s: a batch of %d jobs failed (%s, raised at %s)", route, len(jobs), reason, location(cause))
        held = [job.id for job in jobs if queue.fail_attempt(session, job, self.owner, reason, node.max_job_attempts, node.retry_base_s, node.retry_max_s)]
        _remove_written(written, held)
        audit.processed(session, jobs)  # those whose last try this was are quarantined
        metrics.observe_processed(jobs)

    def process(self, session: Session, jobs: list[Job], written: dict[int, list[Path]] | None = None, before_finish: Callable[[], None] | None = None) -> None:
        """Take claimed jobs of one route through its steps and finish each (guarded by
        this worker's lease). ``written`` collects the outbox files made, per job;
        ``before_finish`` is called once the steps are done, before anything is written
        to the database (run_once stops renewing the lease there).

        Raises:
            BatchError: a step failed for the whole batch (the caller counts a try).
        """
        written = {} if written is None else written
        route_name = jobs[0].route
        try:
            route = self.settings.route(route_name)
        except KeyError:
            if before_finish is not None:
                before_finish()
            for job in jobs:
                queue.quarantine_job(session, job, f"route {route_name!r} is no longer configured", owner=self.owner)
            return
        items = [Item(job=j) for j in jobs]
        for it in items:
            try:
                with open(data_path(self.data_dir, it.job.instance.path), "rb") as fh:
                    it.original = fh.read()
                expected = it.job.instance.digest
                if expected is not None and hashlib.sha256(it.original).hexdigest() != expected:  # node.spool.matches_digest, on the bytes read
                    metrics.SPOOL_DIGEST_MISMATCHES.labels(where="pipeline").inc()
                    it.error = "read: the spooled object does not match its digest (torn by a crash mid-write?)"
                    continue
                it.source = dcmread(io.BytesIO(it.original))
            except Exception as exc:
                it.error = f"read: cannot read the spooled object ({type(exc).__name__})"
        live = [it for it in items if not it.error]
        if route.deid is not None and route.deid.burned_in == "clean":
            self._clean_burned_in(live, route)
            live = [it for it in live if not it.error]
        if route.pixels == "anonymize":
            why = self.pixel_step.available(route) if self.pixel_step else "the pixel step is not installed"
            if why:
                for it in live:
                    it.error = f"pixels: pixel anonymization required but not available: {why}"
            elif live:
                try:
                    with metrics.timed("pixels"):
                        self.pixel_step.process(live, route, self.pseudo)  # type: ignore[union-attr]
                except Exception as exc:  # the whole step failed: a try of every job, not a verdict
                    raise BatchError("pixels", exc) from exc
                for it in live:
                    if it.error and not it.error.startswith("pixels:"):
                        it.error = f"pixels: {it.error}"
        else:
            for it in live:
                it.outputs = [("deidentified" if route.deid else "forwarded", it.source)]  # type: ignore[list-item]
        for it in items:
            for step, value in it.notes.items():
                queue.note_job(it.job, step, value)
        mappings: dict[str, dict[str, str]] = {}
        headers = metrics.timed("headers").start()
        for it in items:
            if it.error:
                continue
            if route.deid is None:
                continue
            try:
                deid = self.deidentifier(route)
                extra = [CLEAN_PIXEL_CODE, CLEAN_VISUAL_CODE] if route.pixels == "anonymize" else []
                if it.pixels_cleaned and CLEAN_PIXEL_CODE not in extra:
                    extra.append(CLEAN_PIXEL_CODE)
                originals = {kw: str(it.source.get(kw, "") or "") for kw in _LEVELS} if it.source is not None else {}
                for kind, ds in it.outputs:
                    # Attributes the pixel step wrote itself hold no PHI; the profile would
                    # remove some of them (DerivationDescription, SeriesDescription are X).
                    authored = {kw: ds[kw].value for kw in AUTHORED.get(kind, ()) if kw in ds}
                    res = deid.apply(ds, extra_codes=extra)
                    for kw, value in authored.items():
                        setattr(ds, kw, value)
                    _collect_mappings(mappings, kind, res, originals)
                self._verify(it, route)
            except QuarantineError as exc:
                it.error = f"headers: {exc}"
            except Exception as exc:
                it.error = describe("headers", exc)
                log.warning("job %d: header de-identification raised %s at %s", it.job.id, type(exc).__name__, location(exc))
        for it in items:
            if it.error:
                it.error = self._clean(it, it.error)
        headers.stop()
        if route.partial == "quarantine-study":
            first_error: dict[int, str] = {}
            for it in items:
                if it.error:
                    first_error.setdefault(it.job.study_id, it.error)
            for it in items:
                if not it.error and it.job.study_id in first_error:
                    it.error = f"another object of this study was quarantined (partial = quarantine-study): {first_error[it.job.study_id]}"
        if before_finish is not None:
            before_finish()
        self._finish(session, route, items, written)
        self._save_mappings(session, mappings)
        audit.processed(session, jobs)
        metrics.observe_processed(jobs)

    def _finish(self, session: Session, route: Route, items: list[Item], written: dict[int, list[Path]]) -> None:
        """Write the outputs of the items without an error, then record every item's end
        (quarantined, finished, or put off when the outbox cannot be written: not
        counted as a try). Files first, so that the database's write lock is not held
        while they are made."""
        node = self.settings.node
        outputs: dict[int, list[Output]] = {}
        put_off: dict[int, str] = {}
        for it in items:
            if it.error:
                continue
            mine = written.setdefault(it.job.id, [])
            try:
                outputs[it.job.id] = [
                    self._write_output(route, kind, ds, mine, it.encoded[k] if k < len(it.encoded) else None) for k, (kind, ds) in enumerate(it.outputs)
                ]
            except OSError as exc:  # disk full, read-only: nothing was delivered; the job waits
                put_off[it.job.id] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            except Exception as exc:  # the output cannot be encoded: a verdict on this object
                it.error = describe("write", exc)
        # Jobs whose lease passed to another worker are left alone, and keep their
        # files: that worker writes the same paths. The others are held (locked) in one
        # statement, and their instances and studies settled together at the end.
        held = {job.id for job in queue.hold_jobs(session, [it.job for it in items], self.owner)}
        ended = []
        for it in items:
            job = it.job
            if job.id not in held:
                continue
            if it.error:
                queue.quarantine_job(session, job, it.error, settle=False)
                _remove_written(written, [job.id])
                ended.append(job)
            elif job.id in put_off:
                queue.defer_job(session, job, None, f"outbox: cannot write ({put_off[job.id]})", node.retry_base_s, node.retry_max_s)
                _remove_written(written, [job.id])
            else:
                queue.finish_job(session, job, outputs[job.id], route.destinations, settle=False)
                ended.append(job)
                if route.index and self.indexer is not None:
                    self.indexer.add(session, route, job, [(kind, ds, out) for (kind, ds), out in zip(it.outputs, outputs[job.id])])
        queue.settle_jobs(session, ended)
        if put_off:
            log.error("route %s: cannot write the outbox (%s): %d jobs put off", route.name, ", ".join(sorted(set(put_off.values()))), len(put_off))

    def _clean(self, it: Item, text: str) -> str:
        """``text`` (a reason) with any text value of the object's original header cut
        out (a step's own message should hold none; this makes sure)."""
        try:
            original = dcmread(io.BytesIO(it.original) if it.original else data_path(self.data_dir, it.job.instance.path), stop_before_pixels=True)
        except Exception:  # nothing to compare against: keep the step and the class only
            return text.split(":", 1)[0] + ": (details withheld: the object is unreadable)" if ":" in text else text
        return scrub(text, original)

    def _clean_burned_in(self, items: list[Item], route: Route) -> None:
        """Mask burned-in text in the sources the route's policy would hold back; record
        the masked boxes per object; quarantine what cannot be shown clean."""
        from node.burnedin import BurnedInError, BurnedInStep
        from node.config import ConfigError

        if self._burned_in is None:
            try:
                self._burned_in = BurnedInStep(self.settings.node.burned_in_regions, lanes=self.settings.node.burned_in_lanes)
            except ConfigError as exc:
                log.error("burned-in region rules cannot be read: %s", exc)
                for it in items:
                    it.error = "burned-in text: the region rules file cannot be read (see the log)"
                return
        deid = self.deidentifier(route)
        for it, report in zip(items, self._burned_in.clean_all([(it.source, deid) for it in items])):
            if isinstance(report, BurnedInError):
                it.error = str(report)
                continue
            if report is not None:
                it.pixels_cleaned = True
                queue.note_job(it.job, "burned_in", report.record())

    def _verify(self, it: Item, route: Route) -> None:
        """The verifier (node.deid.verify) on every output of one object, against the
        spooled original; a finding quarantines the object, naming the attribute.

        Raises:
            QuarantineError: an identifying value of the input is in an output, or the
                verifier cannot read one of them.
        """
        assert route.deid is not None
        policy = Policy.from_options(route.deid.options)
        it.encoded = []
        for _, ds in it.outputs:
            data = to_bytes(ds)
            try:
                findings = verify(it.original, data, policy)
            except VerifyError as exc:
                raise QuarantineError(f"verifier: {exc}") from None
            if findings:
                raise QuarantineError(reason(findings))
            it.encoded.append(data)

    def _write_output(self, route: Route, kind: str, ds: Dataset, written: list[Path], data: bytes | None = None) -> Output:
        sop = str(ds.SOPInstanceUID)
        data = data if data is not None else to_bytes(ds)
        path = outbox_path(self.outbox, route.name, str(ds.get("StudyInstanceUID", "")), sop)
        write_atomic(path, data)
        written.append(path)
        return Output(
            kind=kind,
            sop_instance_uid=sop,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            path=row_path(self.data_dir, path),
        )

    def _save_mappings(self, session: Session, mappings: dict[str, dict[str, str]]) -> None:
        """Store every mapping the header step made (kinds: see _collect_mappings) with
        :func:`node.mapping.save` (the first value of each (kind, old) wins, its age is
        refreshed); none with ``[retention] mapping_days = 0`` (no re-identification
        wanted: nothing but the keyed pseudonyms, which need no table)."""
        if self.settings.retention.mapping_days == 0:
            return
        rows = [{"kind": kind, "old": old, "new": new} for kind, pairs in mappings.items() for old, new in pairs.items()]
        mapping.save(session, rows)


_LEVELS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
LEVEL_KINDS = {"SOPInstanceUID": "sop", "SeriesInstanceUID": "series", "StudyInstanceUID": "study", "FrameOfReferenceUID": "for"}
OUTPUT_KINDS = {"deidentified": "deid", "anonymized": "anon", "counterfactual": "cf", "forwarded": "fwd"}


def _collect_mappings(mappings: dict[str, dict[str, str]], kind: str, res: Result, originals: dict[str, str]) -> None:
    """What an honest broker needs, from one header step (Result) on one output:

    * ``<level>/<output kind>`` (e.g. ``sop/anon``): the original SOP/Series/Study/Frame
      of Reference UID of the received object -> the UID of this output, composed with
      the pixel step's own derivation (a derived image's input UID is an intermediate
      one, found in no source file);
    * ``uid``: every other UID the header step replaced (references), original -> output;
    * ``patient``: [issuer, Patient ID] (JSON) -> pseudonymous Patient ID;
    * ``patient-name``: [issuer, Patient ID, Patient's Name] -> pseudonymous name;
    * ``date-offset``: [issuer, Patient ID] -> days the dates moved.
    """
    short = OUTPUT_KINDS.get(kind, kind[:8])
    intermediate = set()
    for keyword, (given, final) in res.levels.items():
        original = originals.get(keyword) or given
        if given != original:
            intermediate.add(given)
        mappings.setdefault(f"{LEVEL_KINDS[keyword]}/{short}", {})[original] = final
    uids = mappings.setdefault("uid", {})
    for old, new in res.uid_map.items():
        if old not in intermediate:
            uids[old] = new
    for p in res.patients.values():
        who = json.dumps([p.issuer, p.patient_id])
        mappings.setdefault("patient", {})[who] = p.new_id
        if p.name:
            mappings.setdefault("patient-name", {})[json.dumps([p.issuer, p.patient_id, p.name])] = p.new_name
        if p.offset_days is not None:
            mappings.setdefault("date-offset", {})[who] = str(p.offset_days)


def _remove_written(written: dict[int, list[Path]], job_ids: list[int]) -> None:
    """Delete the outbox files made for jobs that will not finish now (they are made
    again, at the same paths, when the job is tried again)."""
    for job_id in job_ids:
        for path in written.pop(job_id, []):
            path.unlink(missing_ok=True)

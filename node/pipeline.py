"""One study through one route: pixel step, header step, outbox, deliveries.

Fail closed: a step that the route requires and that raises, or is not available,
quarantines the object with the reason, and nothing of it reaches the outbox. With
``partial = "quarantine-study"`` (the default) one quarantined object quarantines the
rest of the batch as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from typing import Protocol

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import audit, metrics, queue
from node.config import Route, Settings
from node.db import Job, Output, Pseudonym
from node.deid import Deidentifier, Pseudonymizer, QuarantineError, Result, to_bytes
from node.deid.profile import CLEAN_PIXEL_CODE, CLEAN_VISUAL_CODE
from node.deid.verify import Policy, VerifyError, reason, verify
from node.spool import write_atomic

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


class PixelStep(Protocol):
    """What the pixel anonymization step offers the pipeline (see node.pixels)."""

    def available(self, route: Route) -> str | None:
        """None when the route's model is ready; else why not."""

    def process(self, items: list[Item], route: Route, pseudo: Pseudonymizer) -> None:
        """Fill each item's ``outputs`` with derived datasets, or set its ``error``."""


class Pipeline:
    def __init__(self, settings: Settings, sessions: sessionmaker, pseudo: Pseudonymizer, pixel_step: PixelStep | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.pseudo = pseudo
        self.pixel_step = pixel_step
        self.outbox = settings.node.data_dir / "outbox"
        self._deid: dict[str, Deidentifier] = {}

    def deidentifier(self, route: Route) -> Deidentifier:
        if route.name not in self._deid:
            assert route.deid is not None
            self._deid[route.name] = Deidentifier(route.deid, self.pseudo, pixels_cleaned=route.pixels == "anonymize")
        return self._deid[route.name]

    def run_once(self) -> int:
        """Claim one batch of jobs (one study, one route) and process it; returns its size."""
        with self.sessions() as session:
            jobs = queue.claim_jobs(session, self.settings.node.lease_s)
            session.commit()
            if not jobs:
                return 0
            self.process(session, jobs)
            session.commit()
            return len(jobs)

    def process(self, session: Session, jobs: list[Job]) -> None:
        route_name = jobs[0].route
        try:
            route = self.settings.route(route_name)
        except KeyError:
            for job in jobs:
                queue.quarantine_job(session, job, f"route {route_name!r} is no longer configured")
            return
        items = [Item(job=j) for j in jobs]
        for it in items:
            try:
                with open(it.job.instance.path, "rb") as fh:
                    it.original = fh.read()
                it.source = dcmread(io.BytesIO(it.original))
            except Exception as exc:
                it.error = f"cannot read the spooled object ({type(exc).__name__})"
        live = [it for it in items if not it.error]
        if route.pixels == "anonymize":
            why = self.pixel_step.available(route) if self.pixel_step else "the pixel step is not installed"
            if why:
                for it in live:
                    it.error = f"pixel anonymization required but not available: {why}"
            else:
                try:
                    with metrics.timed("pixels"):
                        self.pixel_step.process(live, route, self.pseudo)  # type: ignore[union-attr]
                except Exception as exc:  # the whole step failed: nobody passes
                    log.exception("pixel step failed for route %s", route.name)
                    for it in live:
                        it.error = it.error or f"pixel step failed ({type(exc).__name__}: {exc})"
        else:
            for it in live:
                it.outputs = [("deidentified" if route.deid else "forwarded", it.source)]  # type: ignore[list-item]
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
                it.error = str(exc)
            except Exception as exc:
                log.exception("header de-identification failed for job %d", it.job.id)
                it.error = f"header de-identification failed ({type(exc).__name__}: {exc})"
        headers.stop()
        if route.partial == "quarantine-study":
            first_error: dict[int, str] = {}
            for it in items:
                if it.error:
                    first_error.setdefault(it.job.study_id, it.error)
            for it in items:
                if not it.error and it.job.study_id in first_error:
                    it.error = f"another object of this study was quarantined (partial = quarantine-study): {first_error[it.job.study_id]}"
        for it in items:
            if it.error:
                queue.quarantine_job(session, it.job, it.error)
                continue
            outputs = []
            try:
                for k, (kind, ds) in enumerate(it.outputs):
                    outputs.append(self._write_output(route, kind, ds, it.encoded[k] if k < len(it.encoded) else None))
            except OSError as exc:
                # The outbox cannot be written: leave the job claimed; its lease expires and
                # it is tried again. Nothing was delivered.
                log.error("job %d: cannot write outbox (%s); will retry", it.job.id, exc.strerror)
                continue
            queue.finish_job(session, it.job, outputs, route.destinations)
        self._save_mappings(session, mappings)
        audit.processed(session, jobs)
        metrics.observe_processed(jobs)

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

    def _write_output(self, route: Route, kind: str, ds: Dataset, data: bytes | None = None) -> Output:
        sop = str(ds.SOPInstanceUID)
        data = data if data is not None else to_bytes(ds)
        h = hashlib.sha256(f"{route.name}/{ds.get('StudyInstanceUID', '')}".encode()).hexdigest()[:24]
        path = self.outbox / route.name / h / f"{sop}.dcm"
        write_atomic(path, data)
        return Output(
            kind=kind,
            sop_instance_uid=sop,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            path=str(path),
        )

    def _save_mappings(self, session: Session, mappings: dict[str, dict[str, str]]) -> None:
        """Store every mapping the header step made (kinds: see _collect_mappings), the
        first value of each (kind, old) winning: pseudonyms are stable, so a later one
        is the same."""
        for kind, mapping in mappings.items():
            if not mapping:
                continue
            known = set(session.scalars(select(Pseudonym.old).where(Pseudonym.kind == kind, Pseudonym.old.in_(list(mapping)))))
            for old, new in mapping.items():
                if old not in known:
                    session.add(Pseudonym(kind=kind, old=old, new=new))


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

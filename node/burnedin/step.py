"""The burned-in cleaning step, for routes with ``deid = { ..., burned_in = "clean" }``.

Which objects: those the route's burned-in policy would hold back
(``Deidentifier.check_burned_in`` raises); the others pass untouched. A cleaned object
carries BurnedInAnnotation NO, and the header step adds the Clean Pixel Data code
(113101) to its De-identification Method Code Sequence. Anything the step cannot show
clean raises :class:`BurnedInError` (the pipeline quarantines the object with it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom import Dataset

from node.burnedin.clean import BurnedInError, CleanReport, clean
from node.burnedin.detect import VERIFIER, DetectorSettings, DetectorUnavailable, TextDetector, shared_detector
from node.burnedin.regions import RegionRules
from node.deid import Deidentifier, QuarantineError

log = logging.getLogger(__name__)


class BurnedInStep:
    """Region rules read once; the text detector loaded on first use, once per process."""

    def __init__(self, rules_path: Path | None = None, detector: DetectorSettings | None = None) -> None:
        self.rules = RegionRules.load(rules_path)
        self.detector_settings = detector or DetectorSettings()
        self._detector: TextDetector | None = None
        self._verifier: TextDetector | None = None
        self._lock = threading.Lock()

    def detector(self) -> TextDetector:
        """Raises DetectorUnavailable when the OCR package or its model is missing."""
        with self._lock:
            if self._detector is None:
                self._detector = shared_detector(self.detector_settings)
            return self._detector

    def verifier(self) -> TextDetector:
        """The second reading's detector (its own session, :data:`VERIFIER` settings).

        Raises DetectorUnavailable like :meth:`detector`."""
        with self._lock:
            if self._verifier is None:
                self._verifier = shared_detector(VERIFIER)
            return self._verifier

    @staticmethod
    def needed(ds: Dataset, deid: Deidentifier) -> bool:
        """True when the route's policy would hold ``ds`` back for burned-in text."""
        try:
            deid.check_burned_in(ds)
        except QuarantineError:
            return True
        return False

    def clean(self, ds: Dataset, deid: Deidentifier) -> CleanReport | None:
        """Mask the burned-in text of ``ds`` in place; None when the policy does not ask for it.

        Raises:
            BurnedInError: text left, a frame the detector cannot process, pixels that
                cannot be read, or no detector installed (the reason names no value).
        """
        if not self.needed(ds, deid):
            return None
        try:
            detector, verifier = self.detector(), self.verifier()
        except DetectorUnavailable as exc:
            raise BurnedInError(f"burned-in text: the text detector is not available ({exc})") from None
        report = clean(ds, detector, self.rules, verifier)
        log.info("burned-in step: %d frame(s), %d read, %d box(es) masked, %.2f s (OCR %.2f s)", report.frames, len(report.read),
                 sum(len(v) for v in report.masked.values()), report.seconds, report.ocr_seconds)
        return report

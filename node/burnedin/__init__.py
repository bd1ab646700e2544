"""Burned-in text: find it in the pixels and mask it, or hold the object back.

``detect`` finds text (an OCR detection model shipped in a wheel), ``regions`` holds
the per-device rectangles that are always blanked, ``ink`` a classical reading of text
ink (flat strokes of one value) beside the network's, ``clean`` masks and verifies one
dataset, ``step`` is what the pipeline and ``casemask deid --burned-in clean`` call.
Design and measurements: docs/burned-in.md.
"""

from node.burnedin.clean import BurnedInError, CleanReport
from node.burnedin.step import BurnedInStep

__all__ = ["BurnedInError", "BurnedInStep", "CleanReport"]

"""Header de-identification: the PS3.15 Annex E profile, options and stable pseudonyms,
and an independent verifier of its output (``node.deid.verify``)."""

from node.deid.deidentify import Deidentifier, Patient, QuarantineError, Result
from node.deid.encoding import to_bytes
from node.deid.pseudonyms import Pseudonymizer, load_or_create_secret, patient_key

__all__ = ["Deidentifier", "Patient", "Pseudonymizer", "QuarantineError", "Result", "load_or_create_secret", "patient_key", "to_bytes"]

"""Header de-identification: the PS3.15 Annex E profile, options and stable pseudonyms."""

from node.deid.deidentify import Deidentifier, QuarantineError, Result, to_bytes
from node.deid.pseudonyms import Pseudonymizer, load_or_create_secret

__all__ = ["Deidentifier", "Pseudonymizer", "QuarantineError", "Result", "load_or_create_secret", "to_bytes"]

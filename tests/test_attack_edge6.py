"""Hostile input against the day's changes outside the de-identifier (docs/security.md,
ninth attack): the mapping CSV's formula guard, the group commit's statements on the
DBAPI cursor, `config check --destinations`. Synthetic values only."""

from __future__ import annotations

import csv
import io

import pytest

from node.mapping import csv_cell, csv_text

# Each would be run by some spreadsheet: a formula character after what a spreadsheet
# drops or trims first, after a control character (OWASP ASVS 5.0 1.2.10 names NUL), or
# in its fullwidth form (read as '=' by spreadsheets in East Asian locales).
HIDDEN_FORMULAS = [
    "\x00=HYPERLINK(\"http://198.51.100.7/x\",\"open\")",
    "\n=1+1",
    " =1+1",
    "\u00a0@SUM(1)",
    "\u200b=1+1",
    "\ufeff=1+1",
    "\u2060+1+2",
    "\uff1dHYPERLINK(\"http://198.51.100.7/x\")",
    "\uff0b1\uff0b2",
    "\uff20SUM(1)",
    "\x0b-1+1",
]


@pytest.mark.parametrize("value", HIDDEN_FORMULAS, ids=repr)
def test_a_formula_behind_invisible_or_fullwidth_characters_is_quoted(value):
    """Before: only a value whose very first character was = + - @ tab CR or ' was
    quoted; each of these was written as it came."""
    cell = csv_cell(value)
    assert cell == "'" + value
    row = next(csv.reader(io.StringIO(csv_text(["v"], [[value]]).split("\r\n", 1)[1])))
    assert row == ["'" + value] and row[0][1:] == value  # one quote dropped: the value back


@pytest.mark.parametrize("value", ["SYN-0002", "Synthetic^Patient", " SYN 1", "O'Brien", "-12", "+3", "a\n=1+1", "", "ÄLVSBY^ANNA"])
def test_ordinary_values_are_written_as_they_are(value):
    """The guard changes nothing else: a hyphen inside, a leading space before a letter,
    a whole number, a newline inside a value (the CSV quotes the cell whole)."""
    assert csv_cell(value) == value

"""Region rules: rectangles always blanked on images of a known device, before OCR.

The idea is CTP's DicomPixelAnonymizer (its DicomPixelAnonymizer.script names, per
Manufacturer, model, Rows and Columns, the rectangles where a device burns in the
patient's data). Here the rules are a TOML file (config/burned_in_regions.toml by
default, ``[node] burned_in_regions`` for a site's own), one ``[[rules]]`` entry each::

    [[rules]]
    name = "Example US 640x480: patient banner"
    manufacturer = "^ACME"           # regex, case-insensitive, searched in Manufacturer
    model = "^SONO ?5"               # regex, case-insensitive, in ManufacturerModelName
    rows = 480
    columns = 640
    image_type = "PRIMARY"           # optional regex in ImageType joined by "\\"
    regions = [{ x = 0, y = 0, width = 640, height = 48 }]

Every rule that matches an object applies (their rectangles add up); a rectangle that
reaches past the image is clipped to it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import StrictInt, field_validator

from node.config import ConfigError, _Table, _validate, hint, read_toml
from node.resources import config_file
from node.wire import peek_float, peek_str, peek_strs

DEFAULT_RULES = config_file("burned_in_regions.toml")

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive)


class Region(_Table):
    x: StrictInt = hint("the left column of the rectangle, 0 or more", ge=0)
    y: StrictInt = hint("the top row of the rectangle, 0 or more", ge=0)
    width: StrictInt = hint("the rectangle's width in pixels, 1 or more", ge=1)
    height: StrictInt = hint("the rectangle's height in pixels, 1 or more", ge=1)

    def box(self, rows: int, cols: int) -> Box | None:
        """(top, left, bottom, right) clipped to the image; None when outside it."""
        top, left = min(self.y, rows), min(self.x, cols)
        bottom, right = min(self.y + self.height, rows), min(self.x + self.width, cols)
        return (top, left, bottom, right) if top < bottom and left < right else None


class Rule(_Table):
    name: str = hint("a name for the rule, e.g. \"ACME SONO5 640x480 banner\"")
    manufacturer: str = hint("a regular expression for Manufacturer, e.g. \"^ACME\"")
    model: str = hint("a regular expression for ManufacturerModelName, e.g. \"^SONO ?5\" (\".*\" for any)", ".*")
    rows: StrictInt = hint("the image's Rows, an integer", ge=1)
    columns: StrictInt = hint("the image's Columns, an integer", ge=1)
    image_type: str | None = hint("a regular expression for ImageType (values joined by \\\\), or leave it out", None)
    regions: list[Region] = hint("a list of rectangles, e.g. [{ x = 0, y = 0, width = 640, height = 48 }]")

    @field_validator("manufacturer", "model", "image_type")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return v

    def matches(self, manufacturer: str, model: str, rows: int, cols: int, image_type: str) -> bool:
        if (rows, cols) != (self.rows, self.columns):
            return False
        if not re.search(self.manufacturer, manufacturer, re.I) or not re.search(self.model, model, re.I):
            return False
        return self.image_type is None or bool(re.search(self.image_type, image_type, re.I))


class RegionRules:
    """The rules of one file, matched against datasets."""

    def __init__(self, rules: list[Rule], source: str = "") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None = None) -> RegionRules:
        """Read and validate a rules file (the shipped one when ``path`` is None).

        Raises:
            ConfigError: the file is missing, not TOML, or a rule is invalid.
        """
        p = Path(path) if path is not None else DEFAULT_RULES
        raw = read_toml(p)
        problems: list[str] = []
        unknown = set(raw) - {"rules"}
        if unknown:
            problems.append(f"unknown table(s) {', '.join(sorted(unknown))}: the file holds [[rules]] entries only")
        entries = raw.get("rules", [])
        if not isinstance(entries, list):
            problems.append("[[rules]]: expected an array of tables ([[rules]] entries)")
            entries = []
        rules = []
        for k, e in enumerate(entries):
            label = f"[[rules]] '{e.get('name')}'" if isinstance(e, dict) and e.get("name") else f"[[rules]] #{k + 1}"
            rule = _validate(Rule, e, label, problems)
            if rule is not None:
                rules.append(rule)
        if problems:
            raise ConfigError(problems, str(p))
        return cls(rules, str(p))

    def boxes_for(self, ds) -> tuple[list[str], list[Box]]:
        """(names of the matching rules, their rectangles clipped to the image)."""
        rows, cols = int(peek_float(ds, "Rows", 0)), int(peek_float(ds, "Columns", 0))
        manufacturer, model = peek_str(ds, "Manufacturer"), peek_str(ds, "ManufacturerModelName")
        image_type = "\\".join(peek_strs(ds, "ImageType"))
        names: list[str] = []
        boxes: list[Box] = []
        for rule in self.rules:
            if rule.matches(manufacturer, model, rows, cols, image_type):
                names.append(rule.name)
                boxes.extend(b for r in rule.regions if (b := r.box(rows, cols)) is not None)
        return names, boxes

"""The data files casemask ships: the built-in configuration and the profile tables.

In the source tree they live in the top-level ``config/`` folder; a wheel carries that
folder as the package ``casemask_config`` (``pyproject.toml`` / ``setup.py`` map one to
the other without copying a file). Both are read here through :mod:`importlib.resources`,
so an installed ``casemask`` works from any folder.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE = "casemask_config"


def config_file(name: str) -> Path:
    """The path of the shipped data file ``name`` (e.g. ``"annex_e.json"``).

    Raises:
        FileNotFoundError: no such data file ships with casemask.
    """
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        # A source checkout whose editable install predates the mapping: read config/
        # beside the packages (a wheel always has the package).
        root = Path(__file__).resolve().parent.parent / "config"
    path = Path(str(root / name))  # pip installs wheels unzipped: a plain file
    if not path.is_file():
        raise FileNotFoundError(f"{name}: not among casemask's data files ({path.parent})")
    return path

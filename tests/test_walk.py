"""What a new admin meets walking through README.md from a fresh clone: the manual's
length and its first commands, and the messages of the steps that went wrong on the
walk (a pseudonym secret file they wrote themselves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYDICOM_FILES, ROOT

README = ROOT / "README.md"


def casemask(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("content", ["", "ab\n", "not hex at all\n"])
def test_a_secret_file_that_is_short_or_not_hex_is_refused_with_what_to_write(tmp_path, content):
    """A hand-written secret (empty, one byte, not hex) is refused with exit 2 and a
    message saying what to write, never a traceback; nothing is written."""
    key = tmp_path / "s.key"
    key.write_text(content)
    key.chmod(0o600)
    r = casemask("deid", str(PYDICOM_FILES / "CT_small.dcm"), "--out", str(tmp_path / "o"), "--secret", str(key), "-j", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "openssl rand -hex 32" in r.stderr, r.stderr
    assert not list((tmp_path / "o").glob("*.dcm")) if (tmp_path / "o").exists() else True


"""Attacks on the network edge with several receiving processes (node.receivers,
node.slots): each test failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

# In a receiver process: which byte of data_dir/receivers.lock the C-STORE handler locks
# for each SOP Instance UID given on the command line.
_LOCKED_BYTES = """
import fcntl, os, sys, tempfile
from node.scp import StoreHandler

locked = []
fcntl.lockf = lambda fd, op, length=0, start=0, whence=0: locked.append(start) if op == fcntl.LOCK_EX else None
handler = object.__new__(StoreHandler)
handler._locks = [__import__("threading").Lock() for _ in range(256)]
handler._lock_fd = os.open(os.devnull, os.O_RDONLY)
for uid in sys.argv[1:]:
    with handler._one_at_a_time(uid):
        pass
print(locked)
"""


def test_one_sop_instance_uid_locks_the_same_byte_in_every_receiver_process():
    """Two C-STOREs of one SOP Instance UID in two receiver processes must take the same
    byte lock of receivers.lock, else they race for one spool file (a conflicting
    object's clean-up can then delete the file of an object answered Success). The byte
    was ``hash(uid) % 256``, and Python salts str hashes per process (PYTHONHASHSEED):
    two processes locked different bytes."""
    uids = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.840.113619.2.55.3.1", "2.25.1234567890", "1.2.3.4.5.6.7.8.9"]
    seen = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _LOCKED_BYTES, *uids], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.strip().splitlines()[-1])
    assert seen[0] == seen[1], f"the byte locked for one SOP Instance UID differs between processes: {seen}"

"""A sender against routing (third attack pass, docs/security.md "Routing").

A study was routed only once nothing had arrived for ``stable_after_s``. A sender that
sends one object into a study now and then, sooner than that, kept the study RECEIVING
for ever: none of its objects routed, quarantined or deleted (PHI held indefinitely,
and what other senders sent into that study held with it). ``[node] max_study_wait_s``
bounds how long an object waits: then what arrived is routed, and what comes later
follows as an amendment.
"""

from __future__ import annotations

import copy
import time

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from tests.conftest import make_study, node_config, wait_until


def _states(node) -> dict[str, str]:
    from node.db import Instance

    with node.sessions() as s:
        return {i.sop_instance_uid: i.state.value for i in s.scalars(select(Instance))}


def test_a_study_kept_busy_by_a_trickling_sender_is_routed_after_max_study_wait_s(tmp_path, start_node):
    from pynetdicom import AE

    out = tmp_path / "out"
    raw = node_config(tmp_path, [{"name": "f", "kind": "folder", "path": str(out)}], stable_after_s=2.0, max_study_wait_s=3.0)
    node = start_node(raw)
    template = dcmread(make_study(tmp_path / "in", 1)[0])
    study = generate_uid()
    sent: list[str] = []
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(template.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="CASEMASK")
    assert assoc.is_established
    routed_while_trickling = False
    try:
        for _ in range(300):  # one object every 0.2 s (well inside stable_after_s), for at most about 60 s
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000
            sent.append(ds.SOPInstanceUID)
            if _states(node).get(sent[0]) not in (None, "RECEIVED"):
                routed_while_trickling = True
                break
            time.sleep(0.2)
    finally:
        assoc.release()
    assert routed_while_trickling, "the first object was never routed while the sender kept the study busy"
    # what came before and after the early routing is delivered, each object once
    wait_until(lambda: set(_states(node).values()) == {"PROCESSED"} and len(list(out.rglob("*.dcm"))) == len(sent), timeout=90,
               what="every object processed and delivered once")
    assert len(_states(node)) == len(sent)


def test_max_study_wait_s_is_validated():
    import pytest

    from node.config import ConfigError, parse

    raw = node_config(__import__("pathlib").Path("/nonexistent"), [], max_study_wait_s=-1)
    with pytest.raises(ConfigError) as exc:
        parse(raw, "test")
    assert "max_study_wait_s" in str(exc.value)

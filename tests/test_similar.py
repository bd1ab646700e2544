"""The index of similar cases end to end: synthetic patients sent through a node with
``index = true``, queries of held-out visits through ``casemask similar``, the panel, and
a re-index after the model changes."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.db import IndexEntry, Output, data_path
from node.spool import digest
from tests.conftest import ROOT, STORESCU, dcmtk_env, needs_dcmtk, needs_dicomweb, needs_orthanc, node_config, wait_until, write_toml
from tests.httpnode import http_nodes  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

PATIENTS, VISITS = 10, 4  # the last visit of each patient is held out as a query


def synthetic_visits(folder: Path) -> tuple[list[Path], list[Path], dict[str, int]]:
    """(files to send, held-out files, true label per file name) of synthetic DX patients."""
    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies

    files = write_dicom_studies(SyntheticPatients(PATIENTS, VISITS, 64, seed=3131), folder)
    labels = {row["file"]: int(row["label"]) for row in csv.DictReader((folder / "labels.csv").open())}
    held = [f for f in files if f.name.endswith(f"_v{VISITS - 1:02d}.dcm")]
    return [f for f in files if f not in held], held, labels


def casemask(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def snapshot(data_dir: Path) -> dict[str, str]:
    """Every file under the node's data folder with the SHA-256 of its content, the
    database excepted (:func:`db_rows` reads it: opening and closing its file here would
    drop this process's SQLite locks on it)."""
    return {str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(data_dir.rglob("*")) if p.is_file() and not p.name.startswith("casemask.db")}


def written_from(folder: Path, secrets: list[bytes]) -> list[str]:
    """Files under ``folder`` holding any of ``secrets`` (UIDs, a run of pixel bytes)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]


def db_rows(node) -> dict[str, list[tuple]]:
    """Every row of every table of the node's database."""
    from node.db import Base

    with node.sessions() as s:
        return {t.name: [tuple(r) for r in s.execute(select(t))] for t in Base.metadata.sorted_tables}


def allow_demonstration(raw: dict) -> None:
    """The reference bundle is a demonstration model: where routes must say they accept
    one (the gates' ``allow_demonstration_model``), say it."""
    from node.config import Route

    if "allow_demonstration_model" in Route.model_fields:
        for r in raw["routes"]:
            r["allow_demonstration_model"] = True


def swapped_bundle(tmp_path: Path) -> Path:
    """A copy of the reference bundle whose encoder weights were moved a little: another
    model (another weights digest, other medical vectors)."""
    import torch

    from engine import bundle as bundles

    src = bundles.resolve("builtin:reference")
    dst = tmp_path / "reference-v2"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx", "plans"))
    state = torch.load(dst / "weights.pt", weights_only=True)
    g = torch.Generator().manual_seed(5)
    w = state["encoder.fc.2.weight"]
    state["encoder.fc.2.weight"] = w + 0.2 * w.std() * torch.randn(w.shape, generator=g)
    torch.save(state, dst / "weights.pt")
    return dst


@needs_dcmtk
@needs_orthanc
@needs_dicomweb
def judged(node, sent: int) -> int | None:
    """The number of objects whose job is DONE with every delivery SENT, once each of the
    ``sent`` objects has a finished job (DONE or QUARANTINED by a gate); None before."""
    from node.db import Delivery, DeliveryState, Job, JobState

    with node.sessions() as s:
        states = list(s.scalars(select(Job.state)))
        pending = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state != DeliveryState.SENT))
    if len(states) < sent or pending or any(st not in (JobState.DONE, JobState.QUARANTINED) for st in states):
        return None
    return sum(st == JobState.DONE for st in states) or None


def query_secrets(f: Path) -> tuple[list[str], list[str], bytes]:
    """What of a query must never be kept or shown: its own UIDs, its patient's name and
    ID (shared with the patient's indexed visits), and a run of its pixel bytes."""
    q = dcmread(f)
    return ([str(q.SOPInstanceUID), str(q.StudyInstanceUID), str(q.SeriesInstanceUID)], [str(q.PatientID), str(q.PatientName)],
            q.PixelData[1000:1064])


def api_queries(node, held: list[Path], caplog) -> dict[str, dict]:
    """``POST /api/v1/similar`` of each held-out visit against the running node (viewer
    token, raw DICOM body); checks that nothing of a query is stored, logged or answered."""
    import httpx

    from node import accounts

    with node.sessions() as s:
        token = accounts.create_token(s, "similar-viewer", "viewer")
        s.commit()
    data_dir = node.settings.node.data_dir
    files_before = snapshot(data_dir)
    with node.sessions() as s:
        entries_before = s.scalar(select(func.count()).select_from(IndexEntry))
    answers = {}
    caplog.clear()
    with caplog.at_level(logging.DEBUG), httpx.Client(base_url=f"http://127.0.0.1:{node.settings.http.port}",
                                                      headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        for f in held:
            r = client.post("/api/v1/similar", params={"k": 5, "contrast": "true"}, content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text
            uids, names, _ = query_secrets(f)
            assert not [v for v in uids + names if v in r.text]
            answers[f.name] = r.json()
    uids = [u for f in held for u in query_secrets(f)[0]]
    names = [n for f in held for n in query_secrets(f)[1]]
    pixels = [query_secrets(f)[2] for f in held]
    assert "similar cases:" in caplog.text  # the node logged each query, and nothing of it
    assert not [v for v in uids + names if v in caplog.text]
    assert snapshot(data_dir) == files_before and not written_from(data_dir, [u.encode() for u in uids] + pixels)
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(IndexEntry)) == entries_before
    for table, rows in db_rows(node).items():  # no row of any table holds a query's UID
        assert not [r for r in rows if any(u in str(r) for u in uids)], table
    return answers


def test_similar_cases_of_held_out_visits_through_the_node(tmp_path, orthanc_dicomweb, start_node, caplog):
    from engine import load_model
    from node.index import describe, model_input

    web = {"name": "archive", "kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc_dicomweb.http_port}/dicom-web"}
    folder = {"name": "copy", "kind": "folder", "path": str(tmp_path / "copy")}
    raw = node_config(tmp_path, [web, folder])
    raw["routes"] = [{"name": "chest", "match": {"Modality": ["DX", "CR"]}, "deid": {"profile": "basic"}, "pixels": "anonymize",
                      "counterfactuals": True, "model": "reference", "index": True, "destinations": ["archive", "copy"]}]
    raw["models"] = [{"name": "reference", "path": "builtin:reference", "backend": "onnxruntime"}]
    raw["retention"] = {"outputs_days": -1}  # the outbox is emptied on purpose below
    allow_demonstration(raw)
    config = write_toml(raw, tmp_path / "casemask.toml")
    node = start_node(raw, http=True)
    sent, held, labels = synthetic_visits(tmp_path / "dx")
    r = subprocess.run([STORESCU, "-aec", "CASEMASK", "-aet", "STORESCU", "127.0.0.1", str(node.settings.node.port), *map(str, sent)],
                       env=dcmtk_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # every object judged: the gates quarantine a few in-domain images (docs/gates.md); the
    # anonymized + counterfactual of each other object at the DICOMweb archive and in the folder
    passed = wait_until(lambda: judged(node, len(sent)), timeout=600, what="every object processed")
    assert passed >= len(sent) - 6, f"the gates held back {len(sent) - passed} of {len(sent)}"
    wait_until(lambda: len(orthanc_dicomweb.instances()) >= 2 * passed, timeout=120, what="every output at Orthanc")
    wait_until(lambda: len(list((tmp_path / "copy").rglob("*.dcm"))) >= 2 * passed, timeout=60, what="every output in the folder")
    by_api = api_queries(node, held, caplog)
    node.stop()

    # -- the index: one entry per anonymized output, of the anonymized image, pseudonymous --
    model = load_model("builtin:reference", backend="onnxruntime")
    with node.sessions() as s:
        entries = list(s.scalars(select(IndexEntry)))
        outputs = {o.id: o for o in s.scalars(select(Output))}
    assert len(entries) == passed
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in sent}
    study_uids = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in sent}
    for e in entries:
        out = outputs[e.output_id]
        assert out.kind == "anonymized" and e.sop_uid == out.sop_instance_uid
        assert e.sop_uid not in originals and e.study_uid not in study_uids
        assert e.weights == model.bundle.weights_digest() and json.loads(e.destinations) == ["archive", "copy"]
        stored = np.frombuffer(e.medical, np.float32)
        assert stored.shape == (model.bundle.config.med_dim,)  # the medical vector, not identity (id_dim 32)
        copy = dcmread(tmp_path / "copy" / digest(e.study_uid) / digest(e.series_uid) / f"{digest(e.sop_uid)}.dcm")
        med, probs = describe(model, model_input(copy, model.image_size))
        np.testing.assert_allclose(stored, med[0], rtol=1e-4, atol=1e-4)  # of the anonymized image as delivered
        np.testing.assert_allclose(np.frombuffer(e.probabilities, np.float32), probs[0], atol=1e-5)
    # ... and not of the original images
    orig_med, _ = describe(model, np.concatenate([model_input(dcmread(f), model.image_size) for f in sent]))
    index_med = np.stack([np.frombuffer(e.medical, np.float32) for e in entries])
    assert np.abs(index_med[:, None] - orig_med[None]).max(-1).min() > 1e-3

    # -- queries through the CLI: nothing of them stored, logged or indexed --
    before_files, before_rows = snapshot(node.settings.node.data_dir), db_rows(node)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    hits = contrast_ok = agree = 0
    secrets: list[bytes] = []
    for f in held:
        q = dcmread(f)
        secrets += [str(q.SOPInstanceUID).encode(), str(q.StudyInstanceUID).encode(), q.PixelData[1000:1064]]
        r = casemask("-vv", "similar", str(f), "--config", str(config), "--json", "--contrast", "--k", "5", env=env)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        for secret in (str(q.SOPInstanceUID), str(q.StudyInstanceUID), str(q.SeriesInstanceUID), str(q.PatientID), str(q.PatientName)):
            assert secret not in r.stdout and secret not in r.stderr
        truth = labels[f.name]
        classes = model.classes
        agree += answer["query"]["label"] == classes[truth]
        assert len(answer["similar"]) == 5 and answer["index"]["cases"] == passed
        hits += sum(c["label"] == classes[truth] for c in answer["similar"])
        contrast_ok += all(c["label"] != answer["query"]["label"] for c in answer["contrasting"])
        known = {e.sop_uid: e for e in entries}
        for c in answer["similar"] + answer["contrasting"]:
            e = known[c["sop_uid"]]  # an indexed case, by its pseudonymous UIDs
            assert (c["study_uid"], c["series_uid"]) == (e.study_uid, e.series_uid)
            assert [d["destination"] for d in c["fetch"]] == ["archive", "copy"]
            assert all(d["state"] == "SENT" for d in c["fetch"])
        sims = [c["similarity"] for c in answer["similar"]]
        assert sims == sorted(sims, reverse=True)
        # the API answered the same (one service; the running node's model, the same weights)
        api = by_api[f.name]
        assert api["query"]["label"] == answer["query"]["label"] and api["index"] == answer["index"]
        for part in ("similar", "contrasting"):
            assert [c["sop_uid"] for c in api[part]] == [c["sop_uid"] for c in answer[part]]
            np.testing.assert_allclose([c["similarity"] for c in api[part]], [c["similarity"] for c in answer[part]], atol=1e-4)
    assert agree >= len(held) - 2, f"the model named the true label of {agree} of {len(held)} queries"
    precision = hits / (5 * len(held))
    assert precision >= 0.7, f"label precision@5 {precision:.2f}"
    assert contrast_ok == len(held)
    assert snapshot(node.settings.node.data_dir) == before_files
    assert db_rows(node) == before_rows
    assert not written_from(scratch, secrets)  # (ONNX Runtime leaves a session id file there)

    # -- where to fetch: the WADO-RS URL gives the case back from the archive --
    url = answer["similar"][0]["fetch"][0]["wado_rs"]
    req = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(req, timeout=30) as rsp:
        body = rsp.read()
    assert answer["similar"][0]["sop_uid"].encode() in body

    # -- the panel --
    png = tmp_path / "panel.png"
    r = casemask("similar", str(held[0]), "--config", str(config), "--contrast", "--png", str(png), env=env)
    assert r.returncode == 0, r.stderr
    assert "similar cases:" in r.stdout and "contrasting cases" in r.stdout and "/instances/" in r.stdout
    from PIL import Image

    img = Image.open(png)
    assert img.width >= 6 * 64 * 3 and img.height >= 2 * 64 * 3
    tiles = np.asarray(img.convert("L"))
    assert tiles.std() > 20  # images, not a blank panel
    assert snapshot(node.settings.node.data_dir) == before_files and not written_from(scratch, secrets)
    (ROOT / "build" / "test-artifacts").mkdir(parents=True, exist_ok=True)
    shutil.copy(png, ROOT / "build" / "test-artifacts" / "similar-panel.png")  # for a person to look at

    # -- a model change: stale entries are not searched until the index is rebuilt --
    raw["models"][0]["path"] = str(swapped_bundle(tmp_path))
    write_toml(raw, config)
    r = casemask("similar", str(held[0]), "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    stale = json.loads(r.stdout)
    assert stale["index"]["cases"] == 0 and stale["index"]["other_weights"] == passed and stale["similar"] == []
    # retention deleted some outbox files: those come back from the folder copy; one is gone everywhere
    anon_outputs = sorted((o for o in outputs.values() if o.kind == "anonymized"), key=lambda o: o.id)
    for o in anon_outputs[:4]:
        data_path(node.settings.node.data_dir, o.path).unlink()
    lost = anon_outputs[0]
    lost_entry = next(e for e in entries if e.output_id == lost.id)
    (tmp_path / "copy" / digest(lost_entry.study_uid) / digest(lost_entry.series_uid) / f"{digest(lost.sop_instance_uid)}.dcm").unlink()
    r = casemask("index", "rebuild", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert f"{passed - 4} re-indexed from the outbox, 3 from a folder destination, 1 gone" in r.stdout
    assert f"{passed} stale entries removed" in r.stdout
    new = load_model(raw["models"][0]["path"], backend="onnxruntime")
    with node.sessions() as s:
        rebuilt = list(s.scalars(select(IndexEntry)))
    assert len(rebuilt) == passed - 1 and {e.weights for e in rebuilt} == {new.bundle.weights_digest()}
    assert lost.id not in {e.output_id for e in rebuilt}
    e = rebuilt[-1]
    copy = dcmread(tmp_path / "copy" / digest(e.study_uid) / digest(e.series_uid) / f"{digest(e.sop_uid)}.dcm")
    np.testing.assert_allclose(np.frombuffer(e.medical, np.float32), describe(new, model_input(copy, new.image_size))[0][0], rtol=1e-4, atol=1e-4)
    r = casemask("similar", str(held[0]), "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    after = json.loads(r.stdout)
    assert after["index"]["cases"] == passed - 1 and after["index"]["other_weights"] == 0 and len(after["similar"]) == 5
    r = casemask("index", "rebuild", "--config", str(config))
    assert f"{passed - 1} current" in r.stdout  # nothing to do twice


def test_index_needs_an_anonymizing_route(tmp_path):
    from node.config import ConfigError, parse

    raw = node_config(tmp_path, [{"name": "copy", "kind": "folder", "path": str(tmp_path / "c")}])
    raw["routes"][0]["index"] = True
    with pytest.raises(ConfigError, match="index = true needs pixels"):
        parse(raw, "test", base_dir=tmp_path)


def test_similar_refuses_what_is_not_a_dicom_image_without_echoing_it(tmp_path):
    raw = node_config(tmp_path, [{"name": "copy", "kind": "folder", "path": str(tmp_path / "c")}])
    raw["routes"][0].update(pixels="anonymize", index=True)
    allow_demonstration(raw)
    config = write_toml(raw, tmp_path / "casemask.toml")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM: MRN-0000123")
    assert casemask("db", "upgrade", "--config", str(config)).returncode == 0  # a node's database (similar refuses to make one)
    r = casemask("similar", str(junk), "--config", str(config))
    assert r.returncode == 1 and "not a DICOM file" in r.stderr and "MRN" not in r.stderr
    assert not list((tmp_path / "var").rglob("*.dcm"))


class _EncoderDown:
    """The route's model with its encoder failing (fault injection for the index hook)."""

    def __init__(self, model) -> None:
        self.bundle, self.image_size = model.bundle, model.image_size

    def encode(self, x):
        raise RuntimeError("encoder unavailable")


def test_an_index_failure_never_holds_an_output_back(tmp_path, start_node):
    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies
    from node.db import Delivery, DeliveryState, Job, JobState
    from node.index import Indexer
    from tests.conftest import receive

    folder = {"name": "copy", "kind": "folder", "path": str(tmp_path / "copy")}
    raw = node_config(tmp_path, [folder])
    raw["routes"][0].update(match={"Modality": ["DX"]}, pixels="anonymize", index=True)
    raw["models"] = [{"name": "reference", "path": "builtin:reference", "backend": "onnxruntime"}]
    allow_demonstration(raw)
    node = start_node(raw, listen=False, schedule=False)
    node.pipeline.indexer = Indexer(lambda name: _EncoderDown(node.pixel_step.models[name]))
    for f in write_dicom_studies(SyntheticPatients(2, 1, 64, seed=77), tmp_path / "dx"):
        receive(node, dcmread(f))
    node.tick(stable_after_s=0)
    with node.sessions() as s:
        jobs = list(s.scalars(select(Job)))
        states = set(s.scalars(select(Delivery.state)))
        assert s.scalar(select(IndexEntry.id).limit(1)) is None
    assert jobs and all(j.state == JobState.DONE for j in jobs) and states == {DeliveryState.SENT}
    for j in jobs:
        note = json.loads(j.record)["index"]
        assert note["indexed"] == 0 and "encoder unavailable" in note["reason"] and "index rebuild" in note["reason"]
    assert len(list((tmp_path / "copy").rglob("*.dcm"))) == 2


def test_similar_api_refuses_a_bad_body_clearly_and_echoes_nothing(tmp_path, http_nodes, monkeypatch):
    from engine.data import SyntheticPatients
    from engine.data.dicom import write_dicom_studies
    from node.http import api
    from tests.httpnode import start_http_node

    raw = node_config(tmp_path, [{"name": "copy", "kind": "folder", "path": str(tmp_path / "c")}])
    raw["routes"][0].update(match={"Modality": ["DX"]}, pixels="anonymize", index=True)
    raw["models"] = [{"name": "reference", "path": "builtin:reference", "backend": "onnxruntime"}]
    allow_demonstration(raw)
    hn = start_http_node(raw, tmp_path)
    http_nodes.append(hn)
    viewer = hn.client("viewer")
    dicom = {"Content-Type": "application/dicom"}
    f = write_dicom_studies(SyntheticPatients(1, 1, 64, seed=5), tmp_path / "dx")[0]
    q = dcmread(f)
    uids = [str(q.SOPInstanceUID), str(q.StudyInstanceUID), str(q.PatientID), str(q.PatientName)]

    assert hn.client().post("/api/v1/similar", content=f.read_bytes(), headers=dicom).status_code == 401
    r = viewer.post("/api/v1/similar", content=f.read_bytes(), headers=dicom)  # an empty index: an empty answer
    assert r.status_code == 200, r.text
    assert r.json()["similar"] == [] and r.json()["index"]["cases"] == 0 and not [u for u in uids if u in r.text]
    # what the caller did wrong, in a sentence, never a traceback nor a value it sent
    cases = {
        "not DICOM": (b"not DICOM: MRN-0000123", dicom, 422, "not a DICOM file"),
        "empty": (b"", dicom, 422, "empty"),
        "a form": (b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nMRN-0000123\r\n--x--\r\n",
                   {"Content-Type": "multipart/form-data; boundary=x"}, 415, "not as a form"),
    }
    no_pixels = tmp_path / "no-pixels.dcm"
    del q.PixelData
    q.save_as(no_pixels)
    cases["no pixels"] = (no_pixels.read_bytes(), dicom, 422, "no pixel data")
    for what, (body, headers, status, says) in cases.items():
        r = viewer.post("/api/v1/similar", content=body, headers=headers)
        assert r.status_code == status and says in r.json()["detail"], (what, r.status_code, r.text)
        assert "MRN" not in r.text and "Traceback" not in r.text and not [u for u in uids if u in r.text], what
    assert viewer.post("/api/v1/similar", params={"k": 0}, content=f.read_bytes(), headers=dicom).status_code == 422
    # the size cap: by Content-Length before reading, and while a chunked body is read
    monkeypatch.setattr(api, "MAX_QUERY", 4096)
    r = viewer.post("/api/v1/similar", content=f.read_bytes(), headers=dicom)
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["detail"]
    r = viewer.post("/api/v1/similar", content=iter([f.read_bytes()[:3000], f.read_bytes()[3000:]]), headers=dicom)
    assert r.status_code == 413, r.text
    assert not list((tmp_path / "var").rglob("*.dcm"))
    with hn.node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(IndexEntry)) == 0

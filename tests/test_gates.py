"""The gates: in-domain images pass at the bundle's stated rates; out-of-domain and
inconsistent ones are turned away; the node quarantines with the gate's name."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.data import SyntheticPatients
from engine.data.ood import out_of_domain
from engine.gates import Scores
from node.db import Instance, InstanceState, Job, Output, data_path
from tests.conftest import PYDICOM_FILES, receive
from tests.test_pixels import make_dx, pixel_route

# In-domain images of patients that neither the model (seed 0), its gates' calibration
# (5000) nor the evaluation (1000) saw.
SEED = 7000


@pytest.fixture(scope="module")
def model():
    from engine import load_model

    m = load_model("builtin:reference", backend="onnxruntime", spin=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def in_domain():
    return SyntheticPatients(100, 2, 64, SEED).batch()


def rejected(model, x: np.ndarray, seed: int = 0, draws: int = 1) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    latent = int(model.bundle.dims["vae_latent"])
    noise = rng.standard_normal((len(x), latent)).astype(np.float32)
    redraw = lambda attempt, rows: rng.standard_normal((len(rows), latent)).astype(np.float32)  # noqa: E731
    verdicts = model.anonymize_checked(x, noise, rng.integers(0, model.n_classes, len(x)), redraw=redraw, draws=draws).verdicts
    return {g: float(np.mean([g in v.failed for v in verdicts])) for g in ("domain", "medical", "identity")} | {"any": float(np.mean([not v.passed for v in verdicts]))}


def test_in_domain_patients_pass_each_gate_at_the_stated_rate(model, in_domain):
    """200 images of unseen synthetic patients, judged as the node judges them (redrawn):
    each gate rejects them at about the rate the bundle states (``gates.rates.targets``,
    which is never below what its calibration on other patients measured; a binomial
    margin for 200 images)."""
    from engine.gates import DRAWS

    rates = rejected(model, in_domain.images, draws=DRAWS)
    rates_meta = model.bundle.meta["gates"]["rates"]
    stated = rates_meta["targets"]
    for gate, rate in rates.items():
        if gate == "any":
            gate = "all"
        assert stated[gate] >= rates_meta["calibration"][gate], (gate, stated, rates_meta["calibration"])
        # 3 standard deviations of a binomial at the stated rate (at least 1%), 200 images.
        p = max(stated[gate], 0.01)
        assert rate <= p + 3 * np.sqrt(p * (1 - p) / len(in_domain.images)), (gate, rate, stated)


def test_another_identity_is_drawn_for_an_image_whose_first_lands_near_the_patient(model, in_domain):
    from engine.gates import DRAWS

    once = rejected(model, in_domain.images, seed=3)
    redrawn = rejected(model, in_domain.images, seed=3, draws=DRAWS)
    assert redrawn["identity"] <= once["identity"] and redrawn["identity"] <= 0.02, (once, redrawn)
    assert redrawn["domain"] == once["domain"]  # the input's own gate does not depend on the draw


def test_a_medical_failure_earns_another_draw_and_a_domain_failure_none(model, in_domain):
    """An image whose synthetic identity was drawn so that the classifier reads another
    class gets another identity (each draw judged by every gate; the first that passes
    all is kept, and says which it was); an image the domain gate turns away is not drawn
    again, and a gate that judges the input cannot be asked to retry."""
    from engine.gates import DRAWS

    rng = np.random.default_rng(21)
    latent = int(model.bundle.dims["vae_latent"])
    x = in_domain.images
    noise = rng.standard_normal((len(x), latent)).astype(np.float32)
    calls: list[int] = []

    def redraw(attempt, rows):
        calls.append(len(rows))
        return np.random.default_rng(100 + attempt).standard_normal((len(rows), latent)).astype(np.float32)

    first = model.anonymize_checked(x, noise).verdicts
    kept = model.anonymize_checked(x, noise, redraw=redraw, draws=DRAWS).verdicts
    only_identity = model.anonymize_checked(x, noise, redraw=redraw, draws=DRAWS, retry=("identity",)).verdicts
    med_first = [i for i, v in enumerate(first) if v.failed == ["medical"]]
    assert med_first, "no medical failure among 200 first draws: the test needs another seed"
    assert calls[0] >= len(med_first)
    # Some medical failures pass on a later draw; with identity-only retries none does.
    assert any(kept[i].passed and kept[i].draw > 1 for i in med_first)
    assert all("medical" in only_identity[i].failed for i in med_first)
    assert np.mean(["medical" in v.failed for v in kept]) < np.mean(["medical" in v.failed for v in first])
    for v0, v in zip(first, kept):
        if "domain" in v0.failed:
            assert v.draw == 1 and v.failed == v0.failed
        if v0.passed:  # a first draw that passed is kept
            assert v.draw == 1 and v.gates == v0.gates
    with pytest.raises(ValueError, match="retry"):
        model.anonymize_checked(x[:2], noise[:2], redraw=redraw, draws=DRAWS, retry=("domain",))


def test_domain_gate_turns_away_every_out_of_domain_case(model, in_domain):
    """Every case the issue names (a CT slice, a photograph, noise, inverted, cropped and
    rotated radiographs, a real chest radiograph) fails the domain gate, image by image.
    Upside-down chests are near the edge (the evaluation measured 59 of 60): the domain
    gate takes nearly all, and no gate lets one through."""
    cases = out_of_domain(in_domain.images[:40], model.image_size)
    assert {"ct_slice", "mr_slice", "flat_grey", "noise", "inverted", "upside_down", "rotated_90", "rotated_30", "cropped_centre_half", "cropped_top_half"} <= set(cases)
    for name, x in cases.items():
        rates = rejected(model, x)
        if name == "upside_down":
            assert rates["domain"] >= 0.95 and rates["any"] == 1.0, rates
            continue
        assert rates["domain"] == 1.0, f"{name}: the domain gate passed {1 - rates['domain']:.0%} of it"


def test_medical_gate_rejects_an_image_that_lost_the_original_finding(model, in_domain):
    """The gate's verdict on real classifier outputs: an 'anonymized' image that is in fact
    the patient with another class's medical features must fail, the true anonymized
    image of the same input pass."""
    x = in_domain.images[:60]
    n = len(x)
    gates = model.gates
    med, ident, other = model.encode(x)
    syn = model.synthetic_identities(n, seed=1)
    p_x = model.classify(x)
    expected = p_x.argmax(1)
    confident = p_x.max(1) > 0.9
    other_class = (expected + 1) % model.n_classes
    anon = model.generate(med, syn, other)
    wrong = model.generate(model.prototypes[other_class], syn, other)
    ids = {k: gates.identity_distance(model.encode(v)[1], ident) for k, v in (("good", anon), ("wrong", wrong))}

    def verdicts(img, key):
        return gates.judge(Scores(np.zeros(n), np.zeros(n), p_x, {"anonymized": model.classify(img)}, {"anonymized": ids[key]}))

    bad = verdicts(wrong, "wrong")
    assert all("medical" in v.failed for v, c in zip(bad, confident) if c)
    assert "gate medical failed" in bad[int(np.flatnonzero(confident)[0])].reason()
    good = verdicts(anon, "good")
    assert np.mean(["medical" in v.failed for v in good]) <= 0.05


def test_no_changed_finding_passes_the_medical_gate(model, in_domain):
    """Every image drawn with the prototype of each class other than the one the gates'
    classifier reads in the original, in place of its medical vector, judged as the node
    judges an anonymized image (redrawn as in the node: a medical or identity failure gets
    another identity, up to DRAWS, every draw another chance): the medical gate lets none through. A
    fabricated finding must never go out. Against the true class, the originals the
    classifier misreads let some through (docs/gates.md): held under the rates measured,
    also among originals whose image shows their finding (faint effusions the classifier
    misreads surely; 5 of 398 here, 2 of 592 on the evaluation's seed), the others being
    effusions below the diaphragm, which no reader of the pixels sees."""
    from engine.data.synthetic import finding_shown
    from engine.evaluate import changed_finding

    rng = np.random.default_rng(13)
    latent = int(model.bundle.dims["vae_latent"])
    labels = np.asarray(in_domain.labels)
    shown = finding_shown(in_domain.params, labels)
    report = changed_finding(model, in_domain.images, labels, lambda n: rng.standard_normal((n, latent)).astype(np.float32), shown=shown)
    assert report["images"] == report["images_read"] == 2 * len(in_domain.images)
    assert report["passed_medical_read_count"] == 0, report
    assert report["passed_medical"] <= 0.03, report
    assert report["images_shown"] == 2 * int(shown.sum()) and report["passed_medical_shown_count"] <= 0.02 * report["images_shown"], report


def test_identity_gate_rejects_an_image_that_keeps_the_patient(model, in_domain):
    """An 'anonymized' image drawn with the patient's own identity vector (a reconstruction),
    or another visit of the same patient, is too close: the identity gate fails it."""
    x = in_domain.images
    med, ident, other = model.encode(x)
    gates = model.gates
    rec = model.generate(med, ident, other)
    d_rec = gates.identity_distance(model.encode(rec)[1], ident)
    assert (d_rec <= gates.identity_limit).all()
    first, second = x[0::2], x[1::2]  # two visits of each patient
    d_visit = gates.identity_distance(model.encode(second)[1], model.encode(first)[1])
    assert np.mean(d_visit <= gates.identity_limit) >= 0.95
    n = len(x)
    p = model.classify(x)
    verdict = gates.judge(Scores(np.zeros(n), np.zeros(n), p, {"anonymized": p}, {"anonymized": d_rec}))[0]
    assert verdict.failed == ["identity"] and "gate identity failed" in verdict.reason()


def test_a_bundle_whose_weights_changed_since_its_gates_were_fitted_has_none(tmp_path):
    import shutil

    from engine import bundle
    from engine.gates import GateError, GateSet

    shutil.copytree(bundle.resolve("builtin:reference"), tmp_path / "b", ignore=shutil.ignore_patterns("onnx", "plans"))
    with open(tmp_path / "b" / "weights.pt", "ab") as f:
        f.write(b"\0")
    b = bundle.load(tmp_path / "b")
    with pytest.raises(GateError, match="other weights"):
        GateSet.from_meta(b.meta, b.weights_digest(), b.digest("gates.pt"))
    assert b.shipped_graph("encode") is None  # made from the old weights: not used
    assert b.shipped_graph("classify") is not None  # the gates' graphs are the gates'


def dx_like(ds_source, pixels: np.ndarray, bits: int = 12):
    """A DX object with the header of ``ds_source`` (synthetic PHI) and other pixels."""
    ds = copy.deepcopy(ds_source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            del ds[kw]
    return ds


def fixed_secret(tmp_path) -> str:
    """A pseudonym secret of the test's own: the synthetic identities drawn for each image
    derive from it, so the images and the gates' verdicts are the same on every run."""
    import hashlib

    path = tmp_path / "secret.key"
    path.write_text(hashlib.sha256(b"casemask gate tests").hexdigest() + "\n")
    path.chmod(0o600)
    return str(path)


def test_node_quarantines_with_the_gate_name_and_records_every_score(tmp_path, start_node):
    from engine.gates import DRAWS

    raw = pixel_route(tmp_path, {"name": "f", "kind": "folder", "path": str(tmp_path / "out")}, secret_path=fixed_secret(tmp_path))
    raw["routes"][0]["partial"] = "skip-object"
    raw["routes"][0]["counterfactuals"] = True
    node = start_node(raw, listen=False, schedule=False)
    # Patients whose images lie well inside the domain (seed 2024's third sits at the
    # 99th percentile of in-domain reconstruction errors, where 1% are turned away).
    files, _ = make_dx(tmp_path / "dx", n_patients=3, seed=2025)
    good = [dcmread(f) for f in files]
    ct = dcmread(PYDICOM_FILES / "CT_small.dcm").pixel_array.astype(np.int32)
    ct_as_dx = dx_like(good[0], (ct - ct.min()).clip(0, 4095))  # a CT slice labelled DX
    inverted = dx_like(good[1], 4095 - good[1].pixel_array)  # a radiograph with its grey scale inverted
    for ds in [*good, ct_as_dx, inverted]:
        receive(node, ds)
    node.tick(stable_after_s=0)
    with node.sessions() as s:
        jobs = {j.instance.sop_instance_uid: (j.instance.state, j.reason, json.loads(j.record or "{}")) for j in s.scalars(select(Job))}
        outputs = s.scalars(select(Output)).all()
    for bad in (ct_as_dx, inverted):
        state, reason, record = jobs[str(bad.SOPInstanceUID)]
        assert state == InstanceState.QUARANTINED and "gate domain failed" in reason, reason
        assert record["gates"]["failed"][0] == "domain" and not record["gates"]["passed"]
        assert record["gates"]["draws"] == 1  # the input's own gate: no other identity is tried
        frame = record["gates"]["frames"][0]["domain"]
        assert frame["reconstruction_error"] > frame["reconstruction_limit"] or frame["latent_distance"] > frame["latent_limit"]
        for value in (str(bad.PatientName), str(bad.PatientID)):
            assert value not in reason and value not in json.dumps(record)
    for ds in good:
        state, reason, record = jobs[str(ds.SOPInstanceUID)]
        assert state == InstanceState.PROCESSED, reason
        g = record["gates"]
        assert g["passed"] and g["bundle"] == "reference" and set(g["frames"][0]) == {"domain", "medical", "identity", "draw"}
        assert 1 <= g["frames"][0]["draw"] == g["draws"] <= DRAWS  # which synthetic identity was kept
        assert {"anonymized", "counterfactual"} <= set(g["frames"][0]["identity"])
    assert len(outputs) == 2 * len(good)  # an anonymized image and a counterfactual each; nothing of the others
    out = dcmread(data_path(node.settings.node.data_dir, next(o.path for o in outputs if o.kind == "anonymized")))
    assert (out.Rows, out.Columns) == (64, 64)
    assert "synthesised at 64x64 by model reference " + node.pixel_step.models["reference"].bundle.weights_digest() in out.DerivationDescription


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_a_real_chest_radiograph_is_quarantined_by_the_domain_gate(tmp_path, start_node, name):
    """pydicom-data's real chest CR (1955 x 1841, MONOCHROME1, uncompressed and JPEG 2000):
    the reference model knows only synthetic 64x64 chests, so its domain gate must turn
    the real image away, far beyond its limits, and nothing of it may leave."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except (ValueError, OSError):
        path = None
    if path is None:
        pytest.skip(f"{name} comes with the pydicom-data package (pip install pydicom-data; in casemask[test])")
    raw = pixel_route(tmp_path, {"name": "f", "kind": "folder", "path": str(tmp_path / "out")})
    node = start_node(raw, listen=False, schedule=False)
    ds = dcmread(path)
    assert ds.Modality == "CR" and (ds.Rows, ds.Columns) == (1955, 1841)
    receive(node, ds)
    node.tick(stable_after_s=0)
    with node.sessions() as s:
        job = s.scalars(select(Job)).one()
        state, reason, record = job.instance.state, job.reason, json.loads(job.record)
    assert state == InstanceState.QUARANTINED
    assert "gate domain failed" in reason, reason
    domain = record["gates"]["frames"][0]["domain"]
    # Not a near miss: the real image is several times beyond the limit of the synthetic domain.
    assert domain["reconstruction_error"] > 2 * domain["reconstruction_limit"], domain
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))


def test_refit_classifier_keeps_the_domain_scorer_and_identity_metric(tmp_path):
    """fit-gates --refit-classifier trains the classifier further and calibrates again; the
    domain scorer's weights, the identity whitening and the identity limit stay."""
    import shutil

    import torch

    from engine import bundle as bundles
    from engine.gate_fit import GateFitConfig, fit_gates

    src = bundles.load("builtin:reference")
    shutil.copytree(src.path, tmp_path / "b")
    before = torch.load(tmp_path / "b" / "gates.pt", weights_only=True)
    old = json.loads((tmp_path / "b" / "model.json").read_text())["gates"]
    cfg = GateFitConfig(classifier_epochs=1, classifier_blur=1.0, classifier_lr=1e-3, threads=1)
    b = fit_gates(bundles.load(tmp_path / "b"), cfg, SyntheticPatients(8, 2, 64, 0).batch(), SyntheticPatients(8, 2, 64, 5000).batch(), ship=False, refit_classifier=True)
    after = torch.load(tmp_path / "b" / "gates.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("domain."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("classifier.") and after[k].is_floating_point())
    g = b.meta["gates"]
    assert g["identity_whiten"] == old["identity_whiten"] and g["limits"]["identity_distance"] == old["limits"]["identity_distance"]
    assert g["fit"]["classifier_refit"]["from_digest"] == old["digest"] and g["fit"]["classifier_refit"]["blur"] == 1.0
    assert g["digest"] != old["digest"] and b.has_gates
    with pytest.raises(ValueError, match="calibrate-only"):
        fit_gates(b, cfg, calibrate_only=True, refit_classifier=True)

"""The engine: synthetic patients, model, training, the shipped bundle, evaluation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engine import load_model
from engine.bundle import BUILTIN_DIR, BundleError
from engine.data import CLASSES, SyntheticPatients
from engine.model import DisentanglementModel, ModelConfig


def test_generator_is_deterministic_per_seed():
    a = SyntheticPatients(5, 3, 64, seed=7).batch()
    b = SyntheticPatients(5, 3, 64, seed=7).batch()
    c = SyntheticPatients(5, 3, 64, seed=8).batch()
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.allclose(a.images, c.images)
    assert a.images.dtype == np.float32 and a.images.min() >= -1 and a.images.max() <= 1
    assert a.images.shape == (15, 1, 64, 64)


def test_blocks_of_patients_made_apart_concatenate_to_the_whole_population():
    ds = SyntheticPatients(300, 2, 32, seed=3)
    whole = ds.batch()
    parts = [ds.patients(0, 256), ds.patients(256, 300)]  # as parallel workers make them
    assert np.array_equal(np.concatenate([p.images for p in parts]), whole.images)
    assert np.array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
    assert np.array_equal(np.concatenate([p.patient_ids for p in parts]), whole.patient_ids)
    assert parts[1].patient_ids.min() == 256 and len(parts[1].images) == 44 * 2
    parallel = ds.batch(workers=2)
    assert np.array_equal(parallel.images, whole.images) and np.array_equal(parallel.visits, whole.visits)
    assert all(np.array_equal(parallel.params[k], whole.params[k]) for k in whole.params)


def test_patient_anatomy_is_stable_and_distinct():
    small, big = SyntheticPatients(3, 2, 64, seed=1), SyntheticPatients(9, 5, 64, seed=1)
    for k in range(3):
        assert small.anatomy(k)["heart_w"] == big.anatomy(k)["heart_w"]
    widths = {round(float(big.anatomy(k)["thorax_w"]), 6) for k in range(9)}
    assert len(widths) == 9


def test_visits_vary_medical_state_and_acquisition_independently_of_the_patient():
    b = SyntheticPatients(60, 6, 64, seed=3).batch()
    assert set(np.unique(b.labels)) == set(range(len(CLASSES)))
    # A patient's visits differ from one another (acquisition, disease)...
    same = b.images[b.patient_ids == 0]
    assert min(float(np.abs(same[i] - same[j]).mean()) for i in range(6) for j in range(i + 1, 6)) > 0.005
    # ...and the label does not follow the patient.
    per_patient = [len(set(b.labels[b.patient_ids == p])) for p in range(60)]
    assert np.mean(per_patient) > 1.5


@pytest.mark.parametrize("size,generator", [(64, "conv"), (128, "conv"), (64, "fourier"), (128, "fourier")])
def test_model_shapes(size, generator):
    cfg = ModelConfig(image_size=size, n_identities=7, generator=generator)
    m = DisentanglementModel(cfg).eval()
    x = torch.zeros(3, 1, size, size)
    med, ident, other = m.encoder(x)
    assert (med.shape, ident.shape, other.shape) == ((3, cfg.med_dim), (3, cfg.id_dim), (3, cfg.other_dim))
    assert m.generator(med, ident, other).shape == x.shape
    assert m.identity_head(ident).shape == (3, 7) and m.disease_head(med).shape == (3, 3)
    assert m.anonymize(x, torch.zeros(3, cfg.vae_latent)).shape == x.shape
    assert m.discriminator(x).shape == (3,)


def test_unknown_generator_is_refused():
    with pytest.raises(ValueError, match="generator must be one of conv, fourier"):
        ModelConfig(generator="unet")


def test_fourier_generator_draws_bands_that_the_latent_moves():
    # The quadratic-phase features are what lets the generator draw ribs: changing their
    # coefficients through the latent must move the bands (not only their brightness), and
    # a bundle with this generator exports to ONNX that agrees with PyTorch.
    from engine.model import QuadraticPhaseFeatures

    torch.manual_seed(0)
    q = QuadraticPhaseFeatures(d_in=4, k=3, size=32)
    with torch.no_grad():
        q.coef.weight.normal_(std=0.05)
        f = q(torch.stack([torch.zeros(4), torch.ones(4)]))
    assert f.shape == (2, 6, 32, 32)
    a, b = f[0, 0] / f[0, 0].abs().max(), f[1, 0] / f[1, 0].abs().max()
    assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.9


def test_fourier_bundle_exports_and_old_bundles_stay_conv(tmp_path):
    from engine import bundle
    from engine.export import export_all
    from engine.model import FourierGenerator, Generator

    m = DisentanglementModel(ModelConfig(image_size=32, width=8, other_dim=8, n_identities=4, generator="fourier", fourier_features=4))
    b = bundle.save(m.eval(), tmp_path / "f", {"name": "f"})
    assert len(export_all(b, ["reconstruct", "anonymize"])) == 2  # each checked against PyTorch
    assert isinstance(bundle.load(b.path).load_torch().generator, FourierGenerator)
    # model.json written before the generator key existed describes a conv generator.
    c = bundle.save(DisentanglementModel(ModelConfig(image_size=32, width=8, other_dim=8, n_identities=4)).eval(), tmp_path / "c", {"name": "c"})
    meta = json.loads((c.path / "model.json").read_text())
    del meta["model_config"]["generator"]
    (c.path / "model.json").write_text(json.dumps(meta))
    assert isinstance(bundle.load(c.path).load_torch().generator, Generator)
    # The shipped reference draws with the fourier generator.
    assert isinstance(load_model("builtin:reference", backend="torch").bundle.load_torch().generator, FourierGenerator)


def test_synthetic_batches_carry_what_drew_each_image():
    ds = SyntheticPatients(4, 3, 64, seed=5)
    b = ds.batch()
    for i in range(len(b.labels)):
        assert b.params["rib_spacing"][i] == np.float32(ds.anatomy(int(b.patient_ids[i]))["rib_spacing"])
    # Acquisition varies per visit; anatomy does not.
    assert len(set(b.params["shift_y"].tolist())) == len(b.labels)
    assert len(set(b.params["thorax_w"].tolist())) == 4
    assert ((b.params["rib_phase_image"] >= 0) & (b.params["rib_phase_image"] < 2 * np.pi)).all()
    # Exposure values are the drawn ones, inside their documented ranges.
    assert b.params["gain"].min() >= 1.6 and b.params["noise"].max() <= 0.025


def test_linear_probe_finds_what_the_vectors_hold_and_nothing_else():
    from engine.evaluate import linear_probe_r2

    rng = np.random.default_rng(0)
    z_fit, z_test = rng.standard_normal((400, 12)), rng.standard_normal((300, 12))
    w = rng.standard_normal((12, 2))
    assert linear_probe_r2(z_fit, z_fit @ w, z_test, z_test @ w) > 0.99
    held = rng.standard_normal((400, 1)), rng.standard_normal((300, 1))
    assert linear_probe_r2(z_fit, held[0], z_test, held[1]) < 0.05


def test_short_training_lowers_the_loss_and_resumes(tmp_path):
    from engine.train import TrainConfig, train

    cfg = TrainConfig(patients=8, visits=8, val_visits=2, epochs=4, vae_epochs=2, batch_size=16, seed=0, threads=2, width=16, other_dim=32)
    train(cfg, tmp_path / "run")
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    s1 = [h for h in hist if h["stage"] == 1]
    assert s1[-1]["rec"] < s1[0]["rec"]
    assert s1[-1]["val_l1"] < s1[0]["val_l1"]
    # Asking for more epochs resumes from the checkpoint instead of starting over.
    cfg.epochs = 5
    train(cfg, tmp_path / "run")
    hist2 = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist2 if h["stage"] == 1] == [1, 2, 3, 4, 5]


def test_interrupted_training_resumes_to_the_same_model(tmp_path):
    import warnings

    import torch

    from engine.train import TrainConfig, train

    cfg = TrainConfig(patients=6, visits=6, val_visits=2, epochs=3, vae_epochs=1, batch_size=16, seed=0, threads=2, width=8, other_dim=16)
    whole = train(cfg, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_first(stage, epoch, entry):
        if stage == "stage1" and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", on_epoch=stop_after_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming must not trip the scheduler-order warning
        resumed = train(cfg, tmp_path / "cut")
    lr = [torch.load(d / "checkpoint.pt", weights_only=False)["opt_g"]["param_groups"][0]["lr"] for d in (tmp_path / "whole", tmp_path / "cut")]
    assert lr[0] == pytest.approx(lr[1], rel=1e-9)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_reference_bundle_loads_and_anonymizes_on_cpu():
    m = load_model("builtin:reference", backend="torch")
    x = SyntheticPatients(2, 2, m.image_size, seed=123).batch().images
    a1 = m.anonymize(x, seed=5)
    a2 = m.anonymize(x, seed=5)
    a3 = m.anonymize(x, seed=6)
    assert a1.shape == x.shape
    assert np.array_equal(a1, a2)
    assert not np.allclose(a1, a3)
    assert not np.allclose(a1, x, atol=0.05)
    assert m.counterfactual(x, 1).shape == x.shape
    med, ident, other = m.encode(x)
    assert med.shape[0] == 4
    meta = json.loads((BUILTIN_DIR / "reference" / "model.json").read_text())
    assert len(meta["prototypes"]) == 3 and "evaluation" in meta


def test_reference_synthetic_identities_are_new_yet_among_real_ones():
    # The VAE's identities must be nobody (not nearer a real patient than real patients are
    # to each other), varied, and not far outside the real ones, where the generator draws
    # broken images. The previous reference model failed the last two: its samples spread
    # over 0.13x the real patients' spread and lay 1.35x farther out than real neighbours.
    from engine.evaluate import identity_geometry

    m = load_model("builtin:reference", backend="torch")
    pop = SyntheticPatients(40, 3, m.image_size, seed=321).batch()
    _, ident, _ = m.encode(pop.images)
    g = identity_geometry(ident, pop.patient_ids, m.synthetic_identities(400, 7))
    near_synth, near_real = g["synthetic_identity_nearest_real_median"], g["real_identity_nearest_other_real_median"]
    assert 0.5 * near_real < near_synth < 1.2 * near_real, g
    assert g["synthetic_identity_spread"] > 0.4 * g["real_identity_spread"], g


def test_bundle_from_before_the_standardised_vae_still_loads(tmp_path):
    from engine import bundle

    m = DisentanglementModel(ModelConfig(image_size=32, width=8, other_dim=8, n_identities=4))
    b = bundle.save(m, tmp_path / "old", {"name": "old"})
    state = torch.load(b.path / "weights.pt", weights_only=True)
    del state["vae.center"], state["vae.scale"]
    torch.save(state, b.path / "weights.pt")
    z = torch.randn(3, m.cfg.vae_latent)
    loaded = bundle.load(b.path).load_torch()
    assert torch.allclose(loaded.vae.sample(z), loaded.vae.dec(z))
    # Anything else missing is still refused.
    del state["vae.dec.0.weight"]
    torch.save(state, b.path / "weights.pt")
    with pytest.raises(BundleError, match="vae.dec.0.weight"):
        bundle.load(b.path).load_torch()


def test_unknown_bundle_is_a_clear_error():
    with pytest.raises(BundleError, match="not a model bundle"):
        load_model("builtin:nope")


def test_tiny_evaluation_produces_every_metric(tmp_path):
    from engine.evaluate import EvalConfig, evaluate

    m = load_model("builtin:reference", backend="torch")
    report = evaluate(m, tmp_path, EvalConfig(seed=4242, patients=6, visits=4, held_out=1, disease_patients=12, disease_visits=3, epochs=1))
    for key in ("reid_top1_original", "reid_top1_anonymized", "reid_chance", "verification_auc_anonymized", "disease_acc_original",
                "disease_acc_anonymized", "counterfactual_flip_rate", "reid_top1_counterfactual", "ssim_reconstruction", "psnr_reconstruction"):
        assert isinstance(report[key], float), key
    assert set(report["latent_probe_r2"]) >= {"thorax_w", "rib_spacing", "rib_phase_image"}
    assert all(set(v) == {"identity", "latent"} for v in report["latent_probe_r2"].values())
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.md").exists()
    assert "rib_phase_image" in (tmp_path / "report.md").read_text()
    from PIL import Image

    img = Image.open(tmp_path / "grid.png")
    assert img.width > img.height / 2


def test_evaluation_repeats_itself_and_records_its_thread_count(tmp_path):
    import torch

    from engine.evaluate import EvalConfig, evaluate

    m = load_model("builtin:reference", backend="torch")
    cfg = EvalConfig(seed=4243, patients=5, visits=3, held_out=1, disease_patients=9, disease_visits=2, epochs=2, threads=1)
    before = torch.get_num_threads()
    a, b = evaluate(m, tmp_path / "a", cfg), evaluate(m, tmp_path / "b", cfg)
    assert a["population"]["threads"] == 1
    assert torch.get_num_threads() == before  # the caller's setting comes back
    for key in ("reid_top1_original", "disease_acc_original", "counterfactual_flip_rate", "ssim_reconstruction"):
        assert a[key] == b[key], key


def test_shared_evaluators_judge_a_model_as_its_own_would(tmp_path, monkeypatch):
    from engine import evaluate as ev

    m = load_model("builtin:reference", backend="torch")
    cfg = ev.EvalConfig(seed=4244, patients=5, visits=3, held_out=1, disease_patients=9, disease_visits=2, epochs=2, threads=1)
    ev.train_evaluators(cfg, m.image_size).save(tmp_path / "evaluators.pt")
    shared = ev.Evaluators.load(tmp_path / "evaluators.pt", cfg, m.image_size)
    own = ev.evaluate(m, tmp_path / "own", cfg)

    def no_training(*args):
        raise AssertionError("evaluators were given: none should be trained")

    monkeypatch.setattr(ev, "_train_evaluators", no_training)
    given = ev.evaluate(m, tmp_path / "given", cfg, evaluators=shared)
    for key in ("reid_top1_original", "reid_top1_anonymized", "verification_auc_anonymized", "disease_acc_original", "disease_acc_anonymized", "counterfactual_flip_rate"):
        assert own[key] == given[key], key


def test_evaluation_refuses_the_training_seed(tmp_path):
    from engine.evaluate import EvalConfig, evaluate

    m = load_model("builtin:reference", backend="torch")
    seed = m.bundle.meta["training"]["seed"]
    with pytest.raises(ValueError, match="training seed"):
        evaluate(m, tmp_path, EvalConfig(seed=seed, patients=4, visits=3, held_out=1, epochs=1))


def test_hdf5_layout_loads(tmp_path):
    import h5py

    from engine.data.real import load_hdf5

    b = SyntheticPatients(3, 4, 32, seed=0).batch()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = ((b.images[:, 0] + 1) * 1000).astype(np.uint16)
        f["id"] = b.patient_ids + 100
        f["dis"] = b.labels
        f["set"] = (b.visits == 3).astype(int)
    got = load_hdf5(tmp_path / "d.h5", 64, split=0)
    assert got.images.shape == (9, 1, 64, 64) and set(got.patient_ids) == {0, 1, 2}


def test_training_is_deterministic_per_seed(tmp_path):
    from engine.train import TrainConfig, train

    def weights(run: str, seed: int) -> torch.Tensor:
        cfg = TrainConfig(patients=4, visits=4, val_visits=1, epochs=1, vae_epochs=1, batch_size=8, seed=seed, threads=1, width=16, other_dim=32)
        m = train(cfg, tmp_path / run)
        return torch.cat([p.detach().flatten() for p in m.generator.parameters()])

    a, b, c = weights("a", 3), weights("b", 3), weights("c", 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_autoencoder_trial_reports_ssim_and_the_rib_readout(capsys):
    from engine.research import autoencoder_trial

    assert autoencoder_trial.main(["--generator", "conv", "--epochs", "1", "--patients", "4", "--supervise-ribs", "1", "--edge-weight", "1", "--fit-ribs", "1"]) == 0
    out = capsys.readouterr().out
    ssim_line = next(line for line in out.splitlines() if line.startswith("epoch 1:"))
    assert 0 < float(ssim_line.split("unseen patients ")[1].split(",")[0]) < 1
    assert "rib head R^2" in ssim_line and "fit head R^2" in ssim_line
    assert "latent read-out R^2 rib_spacing" in out


def _research_parser():
    import argparse

    from engine.cli import add_engine_parser

    parser = argparse.ArgumentParser(prog="casemask-research")
    add_engine_parser(parser.add_subparsers(dest="command"), research=True)
    return parser


def test_train_cli_offers_exactly_the_models_generators(tmp_path, capsys):
    from engine.model import GENERATORS

    parser = _research_parser()
    for name in GENERATORS:  # the CLI lists them without importing torch; they must agree
        assert parser.parse_args(["engine", "train", "--out", str(tmp_path), "--generator", name]).generator == name
    with pytest.raises(SystemExit):
        parser.parse_args(["engine", "train", "--out", str(tmp_path), "--generator", "nope"])
    with pytest.raises(SystemExit):
        parser.parse_args(["engine", "train", "--help"])
    offered = capsys.readouterr().out.split("--generator {", 1)[1].split("}", 1)[0]
    assert set(offered.split(",")) == set(GENERATORS)


def test_train_cli_reaches_the_reference_recipe(tmp_path):
    """The shipped command trains the reference recipe by default; the research CLI
    reaches it with every switch spelled out (the recipe as the docs write it)."""
    import argparse

    from engine.cli import add_engine_parser, train_config
    from engine.research.make_reference import REFERENCE

    parser = argparse.ArgumentParser(prog="casemask")
    add_engine_parser(parser.add_subparsers(dest="command"))
    assert train_config(parser.parse_args(["engine", "train", "--out", str(tmp_path), "--threads", "2"])) == REFERENCE
    args = _research_parser().parse_args([
        "engine", "train", "--out", str(tmp_path), "--patients", "1000", "--visits", "24", "--epochs", "8",
        "--vae-epochs", "20", "--batch-size", "64", "--width", "32", "--ssim-weight", "10", "--generator", "fourier",
        "--rib-fit", "10", "--privacy", "uniform", "--disease-guide", "1", "--threads", "2",
    ])
    assert train_config(args) == REFERENCE


def test_train_cli_offers_exactly_the_privacy_modes(tmp_path):
    from engine.train import PRIVACY_MODES

    parser = _research_parser()
    assert parser.parse_args(["engine", "train", "--out", str(tmp_path)]).privacy == "uniform"  # the reference recipe's
    for mode in PRIVACY_MODES:
        assert parser.parse_args(["engine", "train", "--out", str(tmp_path), "--privacy", mode]).privacy == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["engine", "train", "--out", str(tmp_path), "--privacy", "max"])
    assert parser.parse_args(["engine", "train", "--out", str(tmp_path)]).disease_guide == 1.0
    assert parser.parse_args(["engine", "train", "--out", str(tmp_path), "--disease-guide", "0.5"]).disease_guide == 0.5


def test_rib_fit_recovers_a_drawn_band_pattern():
    from engine.ribs import fit_ribs

    g = np.linspace(-1, 1, 64, dtype=np.float32)
    v, u = np.meshgrid(g, g, indexing="ij")
    rng = np.random.default_rng(0)
    truth = [(30.0, 0.5, -4.0, 1.0), (45.0, 0.9, 6.0, -2.5), (38.0, 0.3, 0.0, 0.4)]
    images = np.stack([0.2 * np.cos(w * (v + c * u * u) + t * u + p) + 0.05 * rng.standard_normal(v.shape) for w, c, t, p in truth])
    fit = fit_ribs(images[:, None].astype(np.float32))
    for (w, c, t, p), got in zip(truth, fit):
        assert abs(got[0] - w) <= 1.0 and abs(got[1] - c) <= 0.04 and abs(got[2] - t) <= 1.5
        assert np.cos(p - np.arctan2(got[4], got[3])) > 0.9  # phase within about 25 degrees


def test_rib_fit_reads_the_synthetic_ribs_without_their_labels():
    from engine.ribs import fit_ribs

    b = SyntheticPatients(30, 4, 64, seed=7).batch()
    fit = fit_ribs(b.images)
    freq = 2 * np.pi / b.params["rib_spacing"] / b.params["scale"]
    assert np.corrcoef(fit[:, 0], freq)[0, 1] > 0.85
    assert np.corrcoef(fit[:, 1], b.params["rib_curv"])[0, 1] > 0.6
    assert np.corrcoef(fit[:, 3], np.cos(b.params["rib_phase_image"]))[0, 1] > 0.7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_rib_fit_on_cuda_reads_what_the_cpu_reads():
    from engine.ribs import fit_ribs

    b = SyntheticPatients(20, 3, 64, seed=9).batch()
    cpu, gpu = fit_ribs(b.images), fit_ribs(torch.from_numpy(b.images).cuda())
    # The grid search may pick a neighbouring grid point where two are nearly tied.
    assert np.mean(np.abs(cpu[:, 0] - gpu[:, 0]) <= 1.0) >= 0.95
    assert np.mean(np.cos(np.arctan2(cpu[:, 4], cpu[:, 3]) - np.arctan2(gpu[:, 4], gpu[:, 3])) > 0.9) >= 0.95


def test_training_with_the_rib_fit_teaches_the_latent_the_ribs(tmp_path):
    from engine.train import ResumeError, TrainConfig, train

    cfg = TrainConfig(patients=8, visits=8, val_visits=2, epochs=3, vae_epochs=1, batch_size=16, seed=0, threads=2, width=16, other_dim=32, rib_fit=5.0, privacy="uniform", disease_guide=1.0)
    model = train(cfg, tmp_path / "run")
    s1 = [h for h in json.loads((tmp_path / "run" / "history.json").read_text()) if h["stage"] == 1]
    assert s1[-1]["ribs"] < 0.8 * s1[0]["ribs"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    # The head reads the identity and other vectors only, never the medical one.
    assert ckpt["rib_head"]["weight"].shape == (5, model.cfg.id_dim + model.cfg.other_dim)
    # The disease guide trained beside it and is kept for a resume, outside the bundle.
    assert ckpt["guide"] is not None and all("guide" in h and "guide_real" in h for h in s1)
    with pytest.raises(ResumeError, match="disease_guide=1.0"):
        train(dataclasses.replace(cfg, disease_guide=0.0, epochs=4), tmp_path / "run")
    # Resuming with the fit switched off would drop the head mid-training: refused, clearly.
    with pytest.raises(ResumeError, match="rib_fit=5.0"):
        train(dataclasses.replace(cfg, rib_fit=0.0, epochs=4), tmp_path / "run")
    with pytest.raises(ResumeError, match="privacy='uniform'"):
        train(dataclasses.replace(cfg, privacy="reverse", epochs=4), tmp_path / "run")


def test_frozen_modules_pass_gradients_to_their_inputs_only():
    from engine.train import frozen, guide_classifier

    torch.manual_seed(0)
    guide = guide_classifier(n_classes=3)
    x = torch.randn(4, 1, 64, 64, requires_grad=True)
    F.cross_entropy(frozen(guide, x), torch.tensor([0, 1, 2, 0])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(w.grad is None for w in guide.parameters())
    assert guide(x).shape == (4, 3)


def test_uniform_privacy_is_bounded_at_chance_and_leaves_the_heads_to_learn():
    import math

    from engine.train import TrainConfig, _privacy_losses

    torch.manual_seed(0)
    model = DisentanglementModel(ModelConfig(n_identities=20))
    m = torch.randn(32, model.cfg.med_dim, requires_grad=True)
    o = torch.randn(32, model.cfg.other_dim, requires_grad=True)
    pid = torch.arange(32) % 20
    heads = [*model.privacy_med.parameters(), *model.privacy_other.parameters()]

    loss, ce = _privacy_losses(model, m, o, pid, "uniform")
    # What the encoder minimizes beside the heads' own loss is never below chance for the
    # two heads (2 ln 20): it cannot make them confidently wrong, as reversal can.
    assert (loss - ce).item() >= 2 * math.log(20) - 1e-5
    # The heads are trained only to find the patient: their gradients are those of the
    # cross-entropy alone ...
    got = torch.autograd.grad(loss, heads, retain_graph=True)
    want = torch.autograd.grad(ce, heads, retain_graph=True)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(got, want))
    # ... while the vectors move the heads' prediction towards uniform.
    def spread(mv, ov):
        return sum(-(F.softmax(h(v), 1) * F.log_softmax(h(v), 1)).sum(1).mean() for h, v in ((model.privacy_med, mv), (model.privacy_other, ov)))

    gm, go = torch.autograd.grad(loss, (m, o))
    with torch.no_grad():
        before, after = spread(m, o), spread(m - 0.5 * gm, o - 0.5 * go)
    assert after > before
    with pytest.raises(ValueError, match="privacy must be one of"):
        _privacy_losses(model, m, o, pid, "max")
    with pytest.raises(ValueError, match="privacy must be one of"):
        TrainConfig(privacy="max")


def test_sweep_trains_and_judges_each_variant_with_one_pair_of_evaluators(tmp_path, capsys):
    from engine.evaluate import TARGETS
    from engine.research import sweep

    variants = {"tiny": {"patients": 5, "visits": 2, "val_visits": 1, "batch_size": 5, "width": 8, "other_dim": 8}}
    (tmp_path / "v.json").write_text(json.dumps(variants))
    tiny_eval = {"patients": 4, "visits": 3, "held_out": 1, "disease_patients": 6, "disease_visits": 2, "epochs": 1, "threads": 1}
    rc = sweep.main(["--variants", str(tmp_path / "v.json"), "--out", str(tmp_path / "out"), "--epochs", "1", "--vae-seconds", "0.01",
                     "--calibration-steps", "2", "--device", "cpu", "--workers", "1", "--budget", "300", "--eval", json.dumps(tiny_eval)])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "reports.json").read_text())["tiny"]
    assert set(TARGETS) <= set(report) and report["sweep"]["epochs"] == 1
    assert report["population"]["patients"] == 4  # judged by the evaluation asked for
    trained = json.loads((tmp_path / "out" / "tiny" / "bundle" / "model.json").read_text())["training"]
    assert (trained["patients"], trained["width"], trained["generator"], trained["disease_guide"]) == (5, 8, "fourier", 1.0)  # over the reference recipe
    m = load_model(tmp_path / "out" / "tiny" / "bundle", backend="torch")
    assert m.anonymize(SyntheticPatients(1, 2, 64, seed=3).batch().images, seed=0).shape == (2, 1, 64, 64)
    assert "tiny: " in capsys.readouterr().out and (tmp_path / "out" / "evaluators.pt").exists()


def test_sweep_refuses_what_is_not_a_recipe(tmp_path):
    from engine.research import sweep

    with pytest.raises(ValueError, match="not TrainConfig fields: widht"):
        sweep.recipe({"widht": 32}, "cpu")
    with pytest.raises(ValueError, match="every variant runs on --device"):
        sweep.recipe({"device": "cuda"}, "cpu")
    (tmp_path / "v.json").write_text("{}")
    with pytest.raises(SystemExit, match="no variants"):
        sweep.main(["--variants", str(tmp_path / "v.json"), "--out", str(tmp_path / "out")])


def test_evaluation_ssim_is_scikit_images_structural_similarity():
    """The SSIM the reconstruction target is judged by (engine.evaluate.ssim, also the
    training loss's) against scikit-image's implementation of Wang et al. 2004 with the
    same settings: Gaussian window sigma 1.5, data range 2, population covariance."""
    from skimage.metrics import structural_similarity

    from engine.data import SyntheticPatients
    from engine.evaluate import ssim

    x = SyntheticPatients(4, 2, 64, seed=11).batch().images.astype(np.float64)
    rng = np.random.default_rng(3)
    for y in (np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1), np.roll(x, 2, axis=3), -x, x):
        ref = np.mean([structural_similarity(a[0], b[0], data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                       for a, b in zip(x, y)])
        assert abs(ssim(x, y) - ref) < 1e-6, (ssim(x, y), ref)


def test_verification_auc_is_scikit_learns_roc_auc():
    from sklearn.metrics import roc_auc_score

    from engine.evaluate import auc

    rng = np.random.default_rng(5)
    for shift, n_pos, n_neg in ((0.0, 300, 300), (0.7, 120, 480), (-0.3, 50, 10)):
        pos = np.round(rng.normal(shift, 1, n_pos), 1)  # rounded: ties must count half
        neg = np.round(rng.normal(0, 1, n_neg), 1)
        ref = roc_auc_score(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg])
        assert abs(auc(pos, neg) - ref) < 1e-12, (auc(pos, neg), ref)

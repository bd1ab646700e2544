"""Generator refinement (engine.refine, casemask engine refine)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from torch.nn import functional as F

from engine.data import SyntheticPatients
from engine.model import DisentanglementModel, ModelConfig
from engine.refine import RefineConfig, latents, refine
from engine.train import Dataset, ResumeError


def _data(patients: int = 6, visits: int = 4, seed: int = 0) -> Dataset:
    b = SyntheticPatients(patients, visits, 64, seed).batch()
    return Dataset(torch.from_numpy(b.images), torch.from_numpy(b.patient_ids), torch.from_numpy(b.labels))


def _model() -> DisentanglementModel:
    torch.manual_seed(0)
    model = DisentanglementModel(ModelConfig(image_size=64, n_identities=6, width=8, other_dim=16, generator="fourier"))
    model.prototypes.normal_()
    return model.eval()


def _rec_l1(model: DisentanglementModel, data: Dataset) -> float:
    with torch.no_grad():
        return F.l1_loss(model.generator(*latents(model, data.images)), data.images).item()


CFG = RefineConfig(steps=8, batch_size=8, swaps=2, guide_steps=2, threads=2, checkpoint_every=2)


class _Stop(Exception):
    pass


def _interrupt(cfg: RefineConfig, data: Dataset, out, at: int, monitor_every: int) -> None:
    """Refine a fresh model into ``out`` and break off at step ``at``'s report (before
    that step's checkpoint), as a killed run would."""

    def stop(step, entry):
        if step == at:
            raise _Stop

    with pytest.raises(_Stop):
        refine(_model(), cfg, data, out, monitor_every=monitor_every, on_report=stop)


def _assert_same_generator(a: DisentanglementModel, b: DisentanglementModel) -> None:
    for (name, wa), wb in zip(a.generator.state_dict().items(), b.generator.state_dict().values(), strict=True):
        assert torch.allclose(wa, wb, atol=1e-6), name


def test_refinement_moves_the_generator_alone_and_reconstructs_better(tmp_path):
    data, model = _data(), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l1_before = _rec_l1(model, data)
    history = refine(model, CFG, data, tmp_path / "r", monitor=_data(2, 4, seed=2000), monitor_every=4)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("generator.") for k in moved), sorted(moved)[:5]
    assert _rec_l1(model, data) < l1_before
    assert [h["step"] for h in history] == [4, 8]
    assert {"ssim", "guide_real", "guide_rec", "guide_anon"} <= set(history[-1]["monitor"])
    assert all(p.requires_grad for p in model.parameters())  # handed back as it came


def test_interrupted_refinement_resumes_to_the_same_generator(tmp_path):
    data = _data()
    whole = _model()
    refine(whole, CFG, data, tmp_path / "whole")

    _interrupt(CFG, data, tmp_path / "cut", at=4, monitor_every=4)
    resumed = _model()
    history = refine(resumed, CFG, data, tmp_path / "cut", monitor_every=4)
    assert [h["step"] for h in history] == [4, 8]
    _assert_same_generator(whole, resumed)


def test_refinement_refuses_to_resume_another_recipe(tmp_path):
    data = _data(4, 4)
    refine(_model(), dataclasses.replace(CFG, steps=2), data, tmp_path / "r")
    with pytest.raises(ResumeError, match="another refinement recipe"):
        refine(_model(), dataclasses.replace(CFG, steps=2, lr=5e-4), data, tmp_path / "r")
    # Where and how fast it runs may change.
    refine(_model(), dataclasses.replace(CFG, steps=2, threads=1, checkpoint_every=1), data, tmp_path / "r")


def test_swaps_must_fit_the_batch():
    with pytest.raises(ValueError, match="swaps"):
        RefineConfig(batch_size=8, swaps=5)
    RefineConfig(batch_size=8, swaps=5, disease_guide=0)  # no guide, no swaps
    with pytest.raises(ValueError, match="swap_weight"):
        RefineConfig(disease_guide=0, swap_weight=0.5)


def test_swap_consistency_changes_what_the_generator_learns_and_nothing_else(tmp_path):
    data = _data()
    plain, swapped = _model(), _model()
    refine(plain, CFG, data, tmp_path / "plain", monitor_every=8)
    history = refine(swapped, dataclasses.replace(CFG, swap_weight=0.5), data, tmp_path / "swap", monitor_every=8)
    assert history[-1]["swap"] > 0
    # The term changes what the generator learns, and still only the generator.
    assert not torch.equal(plain.generator.fc[0].weight, swapped.generator.fc[0].weight)
    fresh = _model().encoder.state_dict()
    for name, w in swapped.encoder.state_dict().items():
        assert torch.equal(w, fresh[name]), name


def _parser(research: bool = False):
    from engine.cli import add_engine_parser

    parser = argparse.ArgumentParser(prog="casemask")
    add_engine_parser(parser.add_subparsers(dest="command"), research=research)
    return parser


def test_refine_cli_writes_a_bundle_whose_generator_alone_changed(tmp_path, capsys):
    from engine import bundle
    from engine.train import TrainConfig, train

    cfg = TrainConfig(patients=6, visits=4, val_visits=1, epochs=1, vae_epochs=1, batch_size=8, threads=2, width=8, other_dim=16, generator="fourier")
    model = train(cfg, tmp_path / "train")
    src = bundle.save(model.cpu(), tmp_path / "src", {"name": "tiny", "training": {**dataclasses.asdict(cfg), "data": "synthetic"}})
    args = _parser().parse_args([
        "engine", "refine", "--model", str(src.path), "--out", str(tmp_path / "ref"), "--steps", "4", "--batch-size", "8",
        "--swaps", "2", "--guide-steps", "1", "--monitor-patients", "2", "--threads", "2",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "step 4:" in out and "unseen patients: ssim=" in out
    new = bundle.load(tmp_path / "ref" / "bundle")
    assert new.has_gates and set(new.meta["shipped_graphs"]) == {"encode", "identity", "generate", "classify", "domain"}  # refine fits them
    (stage,) = new.meta["refinement"]
    assert stage["steps"] == 4 and stage["from"] == src.weights_digest()
    assert stage["data"] == "synthetic: 24 training visits of 6 patients"  # the bundle's own population
    assert new.meta["training"]["patients"] == 6
    old_w, new_w = (torch.load(b.path / "weights.pt", weights_only=True) for b in (src, new))
    changed = {k for k in old_w if not torch.equal(old_w[k], new_w[k])}
    assert changed and all(k.startswith("generator.") for k in changed)
    # A different recipe into the same folder is refused, not mixed in.
    args = _parser().parse_args(["engine", "refine", "--model", str(src.path), "--out", str(tmp_path / "ref"), "--steps", "4",
                                 "--batch-size", "8", "--swaps", "2", "--lr", "1e-4", "--monitor-patients", "2"])
    with pytest.raises(SystemExit, match="another refinement recipe"):
        args.func(args)
    # A refined bundle refined again, on more patients of the training population: both
    # refinements are recorded, in order.
    args = _parser().parse_args([
        "engine", "refine", "--model", str(new.path), "--out", str(tmp_path / "again"), "--steps", "2", "--batch-size", "8",
        "--swaps", "2", "--guide-steps", "1", "--monitor-patients", "2", "--patients", "9", "--visits", "2",
    ])
    assert args.func(args) == 0
    again = bundle.load(tmp_path / "again" / "bundle")
    assert [s["from"] for s in again.meta["refinement"]] == [src.weights_digest(), new.weights_digest()]
    assert again.meta["refinement"][1]["data"] == "synthetic: 18 training visits of 9 patients"


def test_refine_cli_needs_data_for_a_bundle_not_trained_on_synthetic_patients(tmp_path):
    from engine import bundle

    src = bundle.save(_model(), tmp_path / "src", {"name": "x", "training": {"data": "hdf5:/somewhere.h5"}})
    args = _parser().parse_args(["engine", "refine", "--model", str(src.path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--data"):
        args.func(args)
    args = _parser().parse_args(["engine", "refine", "--out", str(tmp_path / "o"), "--batch-size", "8", "--swaps", "6"])
    with pytest.raises(SystemExit, match="swaps"):
        args.func(args)


def test_reference_records_the_refinements_make_reference_runs():
    from engine import bundle
    from engine.research.make_reference import REFINE

    meta = json.loads((bundle.BUILTIN_DIR / "reference" / "model.json").read_text())
    assert len(meta["refinement"]) == len(REFINE)
    for recorded, (cfg, _) in zip(meta["refinement"], REFINE):
        assert {k: recorded[k] for k in dataclasses.asdict(cfg) if k != "device"} == {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}


def test_refine_cli_reaches_the_reference_refinements(tmp_path):
    from engine.cli import refine_config
    from engine.research.make_reference import REFINE

    readme = [
        ["--steps", "7500", "--guide-steps", "600", "--threads", "2"],
        ["--patients", "6000", "--visits", "4", "--steps", "3300", "--lr", "3e-4", "--guide-steps", "600", "--swap-weight", "0.5", "--threads", "2"],
        ["--patients", "12000", "--visits", "4", "--steps", "6500", "--batch-size", "64", "--swaps", "16", "--guide-steps", "600",
         "--swap-weight", "0.5", "--identity-guide", "1", "--threads", "2"],
        ["--patients", "12000", "--visits", "4", "--steps", "4000", "--lr", "3e-4", "--guide-steps", "600", "--swap-weight", "0.5", "--threads", "2"],
    ]
    for flags, (cfg, pop) in zip(readme, REFINE, strict=True):
        args = _parser(research=True).parse_args(["engine", "refine", "--out", str(tmp_path), *flags])
        assert refine_config(args) == cfg
        assert (args.patients, args.visits) == (pop or (0, 0))


def test_identity_guard_needs_the_guides_anonymized_images():
    with pytest.raises(ValueError, match="identity_guide"):
        RefineConfig(disease_guide=0, identity_guide=1.0)


def test_reid_loss_moves_an_anonymized_image_away_from_its_source():
    from engine.refine import identity_classifier, reid_loss

    torch.manual_seed(0)
    data = _data(6, 4)
    guide = identity_classifier(6, width=8)
    opt = torch.optim.Adam(guide.parameters(), lr=3e-3)
    for _ in range(150):  # the guide learns to tell the 6 patients apart
        loss = F.cross_entropy(guide(data.images), data.patient_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The worst anonymization: the images unchanged. The guide finds their patients ...
    images = data.images.clone().requires_grad_(True)
    loss, p = reid_loss(guide, images, data.patient_ids)
    assert p.mean() > 0.5 and loss > 0.5
    # ... and the loss's gradient on the images takes that away, without moving the guide.
    weights = [w.clone() for w in guide.parameters()]
    for _ in range(20):
        (grad,) = torch.autograd.grad(reid_loss(guide, images, data.patient_ids)[0], images)
        images = (images - 0.05 * grad.sign()).detach().requires_grad_(True)
    loss_after, p_after = reid_loss(guide, images, data.patient_ids)
    assert p_after.mean() < p.mean() / 2 and loss_after < loss
    assert all(torch.equal(a, b) for a, b in zip(weights, guide.parameters()))


def test_identity_guard_changes_only_the_generator_and_resumes(tmp_path):
    data = _data()
    guarded = dataclasses.replace(CFG, identity_guide=1.0)
    plain, whole = _model(), _model()
    refine(plain, CFG, data, tmp_path / "plain", monitor_every=8)
    history = refine(whole, guarded, data, tmp_path / "whole", monitor_every=8)
    assert history[-1]["id_real"] > 0 and 0 <= history[-1]["id_anon_p"] <= 1
    assert not torch.equal(plain.generator.fc[0].weight, whole.generator.fc[0].weight)
    fresh = _model().state_dict()
    assert all(torch.equal(w, fresh[k]) for k, w in whole.state_dict().items() if not k.startswith("generator."))

    _interrupt(guarded, data, tmp_path / "cut", at=4, monitor_every=4)
    resumed = _model()
    refine(resumed, guarded, data, tmp_path / "cut", monitor_every=4)
    _assert_same_generator(whole, resumed)


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path):
    data = _data(4, 4)
    cfg = dataclasses.replace(CFG, steps=6)

    _interrupt(cfg, data, tmp_path / "r", at=4, monitor_every=2)
    ckpt_path = tmp_path / "r" / "refine.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["config"]["identity_guide"]  # as written before the setting existed
    torch.save(ckpt, ckpt_path)
    history = refine(_model(), cfg, data, tmp_path / "r", monitor_every=2)
    assert [h["step"] for h in history] == [2, 4, 6]
    # The default it stands for is still part of the recipe.
    with pytest.raises(ResumeError):
        refine(_model(), dataclasses.replace(cfg, identity_guide=1.0), data, tmp_path / "r")


def test_make_reference_makes_a_population_shared_by_two_stages_once(monkeypatch):
    from engine.research import make_reference

    calls = []
    real = make_reference.synthetic_split
    monkeypatch.setattr(make_reference, "synthetic_split", lambda cfg, workers=0: calls.append(cfg.patients) or real(cfg, workers))
    cfg = dataclasses.replace(make_reference.REFERENCE, patients=4, visits=2, val_visits=1)
    made: dict = {}
    first = make_reference.refined_data(cfg, (6, 2), None, made)
    assert make_reference.refined_data(cfg, (6, 2), None, made) is first
    assert len(first.labels) == 12 and calls == [6]
    assert make_reference.refined_data(cfg, None, first, made) is first  # the training visits themselves

"""``casemask engine ...``: synth, train, refine, fit-gates, evaluate, export, build, triton-repo.

The shipped command trains with the reference recipe (docs/model-card.md). The switches
that recipe fixes (generator, rib fit, privacy mode, guides, width, SSIM weight) are
research settings: ``casemask-research`` (engine.research.cli) offers them on the same
commands, beside the research tools (docs/engine-research.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


# What the reference recipe fixes and only ``casemask-research`` changes (TrainConfig /
# RefineConfig fields); tests hold it to engine.research.make_reference.
REFERENCE_TRAIN_SWITCHES = {"generator": "fourier", "rib_fit": 10.0, "privacy": "uniform", "disease_guide": 1.0, "width": 32, "ssim_weight": 10.0}
REFERENCE_REFINE_SWITCHES = {"disease_guide": 1.0, "identity_guide": 0.0}


def cmd_synth(args) -> int:
    import numpy as np

    from engine.data import SyntheticPatients

    gen = SyntheticPatients(args.patients, args.visits, args.size, args.seed)
    out = Path(args.out)
    if args.dicom:
        from engine.data.dicom import write_dicom_studies

        files = write_dicom_studies(gen, out)
        print(f"wrote {len(files)} DX studies of {args.patients} synthetic patients to {out} (labels in {out / 'labels.csv'})")
        return 0
    b = gen.batch()
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "synthetic.npz", images=b.images, patient_ids=b.patient_ids, labels=b.labels, visits=b.visits)
    print(f"wrote {len(b.images)} images ({args.size}x{args.size}) to {out / 'synthetic.npz'}")
    return 0


def _load_data(spec: str, size: int, val_visits: int):
    """'hdf5:PATH' or 'dicom:FOLDER,CSV' -> (train, val) Datasets."""
    import torch

    from engine.train import Dataset

    to = lambda b: Dataset(torch.from_numpy(b.images), torch.from_numpy(b.patient_ids), torch.from_numpy(b.labels))  # noqa: E731
    train, val = _load_batches(spec, size, val_visits)
    return to(train), to(val)


def _device(name: str) -> str:
    """``--device``: ``auto`` is cuda when torch sees a GPU, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_config(args):
    """The :class:`engine.train.TrainConfig` that ``casemask engine train`` ARGS asks for."""
    from engine.train import TrainConfig

    device = _device(args.device)
    return TrainConfig(
        image_size=args.size, patients=args.patients, visits=args.visits, val_visits=args.val_visits,
        seed=args.seed, epochs=args.epochs, vae_epochs=args.vae_epochs, batch_size=args.batch_size,
        device=device, threads=args.threads, generator=args.generator, rib_fit=args.rib_fit,
        privacy=args.privacy, disease_guide=args.disease_guide, width=args.width, ssim_weight=args.ssim_weight,
    )


def cmd_train(args) -> int:
    from engine import bundle
    from engine.data import CLASSES
    from engine.train import ResumeError, train

    cfg = train_config(args)
    data = None if args.data == "synthetic" else _load_data(args.data, args.size, args.val_visits)
    try:
        model = train(cfg, Path(args.out), data=data)
    except ResumeError as exc:
        raise SystemExit(f"casemask engine train: {exc}") from None
    meta = {
        "name": Path(args.bundle).name if args.bundle else "model",
        "classes": list(CLASSES),
        "training": {**dataclasses.asdict(cfg), "data": args.data},
        **use_and_data(args.data, args.intended_use, cfg.patients, cfg.patients * cfg.visits, cfg.image_size),
    }
    target = Path(args.bundle) if args.bundle else Path(args.out) / "bundle"
    bundle.save(model.cpu(), target, meta)
    print(f"bundle written to {target}")
    if args.gates:
        from engine.gate_fit import GateFitConfig

        fit_and_report(target, GateFitConfig.for_population(cfg.patients, cfg.visits, cfg.threads), args.data)
    return 0


def use_and_data(data: str, intended_use: str | None, patients: int, images: int, size: int) -> dict:
    """The bundle's ``intended_use`` and ``training_data``: a model trained on synthetic
    patients is a demonstration unless told otherwise."""
    synthetic = data.split(" ")[0] == "synthetic"
    kind = intended_use or ("demonstration" if synthetic else "research")
    summary = {
        "demonstration": f"a demonstration of the method, trained on {'synthetic images only' if synthetic else data}; it redraws any input as an image of its training domain at {size}x{size}: not for patients' images",
        "research": f"research use on images like its training data ({data}); its gates turn away others",
    }.get(kind, kind)
    source = "synthetic chest-radiograph-like patients (engine.data.SyntheticPatients)" if synthetic else data
    return {
        "intended_use": {"kind": kind, "summary": summary},
        "training_data": {"kind": "synthetic" if synthetic else "real", "summary": source, "patients": patients, "images": images, "image_size": size},
    }


def refine_config(args):
    """The :class:`engine.refine.RefineConfig` that ``casemask engine refine`` ARGS asks for."""
    from engine.refine import RefineConfig

    device = _device(args.device)
    try:
        return RefineConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, disease_guide=args.disease_guide,
            guide_steps=args.guide_steps, swaps=args.swaps, swap_weight=args.swap_weight, identity_guide=args.identity_guide, seed=args.seed, device=device, threads=args.threads,
        )
    except ValueError as exc:
        raise SystemExit(f"casemask engine refine: {exc}") from None


def _training_data(b, args):
    """The training visits of the synthetic population ``b`` was trained on (more
    patients or visits of it with ``--patients``/``--visits``), or ``--data``."""
    from engine.train import TrainConfig, synthetic_split

    training = b.meta.get("training", {})
    if args.data is not None and args.data != "synthetic":
        return _load_data(args.data, b.image_size, training.get("val_visits", 4))[0]
    if args.data is None and training.get("data", "synthetic").split(" ")[0] != "synthetic":
        raise SystemExit(f"{b.path} was not trained on synthetic patients: name its data with --data")
    known = {"image_size", "patients", "visits", "val_visits", "seed"}
    cfg = TrainConfig(**{k: v for k, v in training.items() if k in known})
    cfg = dataclasses.replace(cfg, image_size=b.image_size, patients=args.patients or cfg.patients, visits=args.visits or cfg.visits)
    return synthetic_split(cfg, args.workers)[0]


def _refine_line(step: int, entry: dict) -> None:
    mon = entry.get("monitor", {})
    text = " ".join(f"{k}={v:.3f}" for k, v in entry.items() if k not in ("step", "seconds", "monitor"))
    seen = " ".join(f"{k}={v:.3f}" for k, v in mon.items())
    print(f"step {step}: {text} | unseen patients: {seen}", flush=True)


def cmd_refine(args) -> int:
    from engine import bundle
    from engine.refine import data_spec, monitor_set, refine
    from engine.train import ResumeError

    cfg = refine_config(args)
    b = bundle.load(args.model)
    model = b.load_torch()
    data = _training_data(b, args)
    monitor = monitor_set(b.image_size, args.monitor_patients, args.monitor_seed)
    try:
        history = refine(model, cfg, data, Path(args.out), monitor, args.monitor_every, on_report=_refine_line)
    except ResumeError as exc:
        raise SystemExit(f"casemask engine refine: {exc}") from None
    meta = {k: v for k, v in b.meta.items() if k not in ("format", "model_config", "graphs", "prototypes", "evaluation", "refinement", "gates", "shipped_graphs")}
    spec = args.data or data_spec(len(data.labels), int(data.patient_ids.max()) + 1)
    stage = {**dataclasses.asdict(cfg), "data": spec, "from": b.weights_digest(), "monitor": history[-1].get("monitor") if history else None}
    meta["refinement"] = [*b.meta.get("refinement", []), stage]  # every refinement since training, in order
    target = Path(args.bundle) if args.bundle else Path(args.out) / "bundle"
    bundle.save(model.cpu(), target, meta)
    print(f"bundle written to {target} (its evaluation, if any, is not carried over: run casemask engine evaluate)")
    if args.gates:
        from engine.gate_fit import GateFitConfig

        training = b.meta.get("training", {})
        cfg_g = GateFitConfig.for_population(int(training.get("patients", 1000)), int(training.get("visits", 8)), cfg.threads)
        fit_and_report(target, cfg_g, args.data)
    return 0


def cmd_evaluate(args) -> int:
    from engine.api import load_model
    from engine.evaluate import EvalConfig, evaluate, evaluate_gates, gates_markdown, markdown

    model = load_model(args.model, backend=args.backend)
    cfg = EvalConfig(seed=args.seed, patients=args.patients, visits=args.visits, held_out=args.held_out, epochs=args.epochs,
                     disease_patients=args.disease_patients, threads=args.threads, gate_draws=args.draws,
                     gate_retry=tuple(g for g in args.retry.split(",") if g))
    if args.gates_only:
        report = evaluate_gates(model, cfg)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gates.json").write_text(json.dumps(report, indent=1) + "\n")
        print(gates_markdown(report))
        print(f"report: {out / 'gates.json'}")
        return 0
    report = evaluate(model, Path(args.out), cfg)
    print(markdown(report))
    print(f"report: {Path(args.out) / 'report.json'}; grid: {Path(args.out) / 'grid.png'}")
    if args.write_bundle:
        meta_path = model.bundle.path / "model.json"
        meta = json.loads(meta_path.read_text())
        meta["evaluation"] = report
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        print(f"metrics written into {meta_path}")
    return 0


def gate_fit_config(args):
    """The :class:`engine.gate_fit.GateFitConfig` that ``casemask engine fit-gates`` ARGS asks for."""
    from engine.gate_fit import GateFitConfig

    return GateFitConfig(patients=args.patients, visits=args.visits, calibration_seed=args.calibration_seed,
                         domain_frr=args.domain_frr, medical_frr=args.medical_frr, identity_quantile=args.identity_quantile,
                         medical_original=args.medical_original,
                         classifier_epochs=args.classifier_epochs, classifier_blur=args.classifier_blur, classifier_lr=args.classifier_lr,
                         classifier_width=args.classifier_width,
                         decoder_epochs=args.decoder_epochs, threads=args.threads)


def fit_and_report(path: Path, cfg, data: str | None = None, calibrate_only: bool = False, refit_classifier: bool = False) -> None:
    """Fit the gates of the bundle at ``path`` (``engine.gate_fit``) and print what they
    reject; training and refinement end with it, so every bundle they write has gates."""
    from engine import bundle
    from engine.gate_fit import fit_gates

    b = bundle.load(path)
    fit = cal = None
    if data is not None and data != "synthetic":
        fit, cal = _load_batches(data, b.image_size, b.meta.get("training", {}).get("val_visits", 4))
    b = fit_gates(b, cfg, fit, cal, calibrate_only=calibrate_only, refit_classifier=refit_classifier)
    g = b.meta["gates"]
    print(f"gates of {path}: limits {json.dumps(g['limits'])}")
    print(f"  rejected on {g['rates']['calibration_images']} held-out in-domain images: {json.dumps(g['rates']['calibration'])}")
    shipped = b.meta.get("shipped_graphs", {})
    if shipped:
        print(f"  node graphs shipped in {path / 'graphs'}: {sum(e['bytes'] for e in shipped.values()) / 1e6:.1f} MB")


def _load_batches(spec: str, size: int, val_visits: int):
    """'hdf5:PATH' or 'dicom:FOLDER,CSV' -> (training visits, held-out visits) as Batches."""
    import numpy as np

    from engine.data.real import load_dicom_folder, load_hdf5
    from engine.data.synthetic import Batch

    if spec.startswith("hdf5:"):
        b = load_hdf5(spec[5:], size)
    elif spec.startswith("dicom:"):
        folder, csv_path = spec[6:].split(",", 1)
        b = load_dicom_folder(folder, csv_path, size)
    else:
        raise SystemExit(f"--data {spec!r}: use synthetic, hdf5:PATH or dicom:FOLDER,CSV")
    counts = np.bincount(b.patient_ids)
    val = b.visits >= (counts[b.patient_ids] - val_visits).clip(min=1)
    pick = lambda m: Batch(b.images[m], b.patient_ids[m], b.labels[m], b.visits[m])  # noqa: E731
    return pick(~val), pick(val)


def cmd_fit_gates(args) -> int:
    from engine import bundle

    try:
        fit_and_report(bundle.resolve(args.model), gate_fit_config(args), args.data, args.calibrate_only, args.refit_classifier)
    except ValueError as exc:
        raise SystemExit(f"casemask engine fit-gates: {exc}") from None
    return 0


def cmd_export(args) -> int:
    from engine import bundle
    from engine.export import export_all, ship

    b = bundle.load(args.model)
    if args.ship:
        from engine.graphs import NODE_GRAPHS

        for g, e in ship(b, args.graph or NODE_GRAPHS).items():
            print(f"{b.path / e['file']}: {e['bytes']} bytes, checked (onnx.checker, ONNX Runtime vs PyTorch)")
        return 0
    for p in export_all(b, args.graph):
        print(f"{p}: checked (onnx.checker, ONNX Runtime vs PyTorch)")
    return 0


def cmd_build(args) -> int:
    from engine import bundle
    from engine.runtime import make_runner

    b = bundle.load(args.model)
    lo, opt, hi = (int(v) for v in args.profile.split(","))
    for graph in args.graph or ["anonymize", "counterfactual"]:
        runner, _ = make_runner(b, graph, "tensorrt", trt_profile=(lo, opt, hi))
        runner.fp16 = not args.fp32  # type: ignore[attr-defined]
        plan = runner.build()  # type: ignore[attr-defined]
        print(f"{graph}: {plan}")
    return 0


def cmd_triton_repo(args) -> int:
    from engine import bundle
    from engine.runtime import RunnerError
    from engine.runtime.triton_repo import RepoOptions, write_repository

    b = bundle.load(args.model)
    try:
        preferred = tuple(int(v) for v in args.preferred.split(","))
    except ValueError:
        raise SystemExit(f"casemask engine triton-repo: --preferred {args.preferred!r}: batch sizes separated by commas, e.g. 32,128") from None
    opts = RepoOptions(
        name=args.name or args.model.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1], version=args.version, fmt=args.format,
        accelerator=args.accelerator, fp16=args.fp16, max_batch=args.max_batch, preferred=preferred, queue_delay_us=args.queue_delay_us,
        instances=args.instances, kind=args.kind, trt_cache_path=args.trt_cache_path,
    )
    try:
        written = write_repository(b, Path(args.out), opts, args.graph)
    except (ValueError, RunnerError) as exc:
        raise SystemExit("casemask engine triton-repo: " + str(exc).replace("\n", "\ncasemask engine triton-repo: ")) from None
    for path in written:
        print(f"{path.parent.name}: {path}")
    print(f"serve with: tritonserver --model-repository {Path(args.out).resolve()}; in [[models]]: backend = \"triton\", url = \"HOST:8001\", triton_model = \"{opts.name}\"")
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a help text, but only where it says something: not for
    an option without a default (None, ""), a flag (``store_true`` / ``store_false``:
    ``--no-gates (default: True)`` read as if the gates were skipped by default) or a
    help text that names its default already (it read ``(default: OUT/bundle)
    (default: None)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d == "" or isinstance(action, argparse._StoreConstAction) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_engine_parser(sub, research: bool = False) -> None:
    ep = sub.add_parser("engine", help="the anonymization network: synth, train, refine, evaluate, export, build")
    esub = ep.add_subparsers(dest="engine_command", metavar="SUBCOMMAND", required=True)
    add_engine_commands(esub, research)


def add_engine_commands(esub, research: bool = False) -> None:
    """The engine's subcommands; ``research`` adds the switches the reference recipe fixes."""
    defaults = _DefaultsHelp
    sp = esub.add_parser("synth", help="write synthetic patients as arrays or DICOM DX studies", formatter_class=defaults)
    sp.add_argument("--patients", type=int, default=10, help="number of patients")
    sp.add_argument("--visits", type=int, default=3, help="visits (studies) per patient")
    sp.add_argument("--size", type=int, default=64, help="image size in pixels, 64 to 256")
    sp.add_argument("--seed", type=int, default=0, help="the same seed gives the same patients")
    sp.add_argument("--out", required=True, metavar="DIR", help="where the patients go")
    sp.add_argument("--dicom", action="store_true", help="DICOM DX studies with synthetic PHI instead of arrays")
    sp.set_defaults(func=cmd_synth)

    sp = esub.add_parser("train", help="train both stages with the reference recipe (resumable) and write a bundle", formatter_class=defaults)
    sp.add_argument("--out", required=True, metavar="DIR", help="checkpoints and history (resumes if present)")
    sp.add_argument("--bundle", metavar="DIR", help="where to write the bundle (default: OUT/bundle)")
    sp.add_argument("--data", default="synthetic", help="synthetic | hdf5:PATH | dicom:FOLDER,CSV")
    sp.add_argument("--size", type=int, default=64, help="image size (synthetic data)")
    sp.add_argument("--patients", type=int, default=1000, help="synthetic patients")
    sp.add_argument("--visits", type=int, default=24, help="visits per synthetic patient")
    sp.add_argument("--val-visits", type=int, default=4, help="visits per patient kept for validation")
    sp.add_argument("--epochs", type=int, default=8, help="stage 1 (disentanglement) epochs")
    sp.add_argument("--vae-epochs", type=int, default=20, help="stage 2 (identity VAE) epochs")
    sp.add_argument("--batch-size", type=int, default=64, help="images per training step")
    sp.add_argument("--seed", type=int, default=0, help="training is deterministic per seed (on the CPU)")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    sp.add_argument("--intended-use", choices=("demonstration", "research"), help="what the bundle says it is fit for (default: demonstration on synthetic data, research on real data)")
    sp.add_argument("--no-gates", dest="gates", action="store_false", help="skip fitting the gates (the node refuses a bundle without them)")
    if research:
        from engine.research.cli import add_train_switches

        add_train_switches(sp)
    sp.set_defaults(func=cmd_train, **REFERENCE_TRAIN_SWITCHES)

    sp = esub.add_parser("refine", help="more steps for a trained bundle's generator alone (resumable), as a new bundle",
                         formatter_class=defaults)
    sp.add_argument("--model", default="builtin:reference", metavar="NAME_OR_PATH", help="the bundle to refine")
    sp.add_argument("--out", required=True, metavar="DIR", help="checkpoint (resumes if present)")
    sp.add_argument("--bundle", metavar="DIR", help="where to write the refined bundle (default: OUT/bundle)")
    sp.add_argument("--data", help="synthetic | hdf5:PATH | dicom:FOLDER,CSV (default: the synthetic patients the bundle was trained on)")
    sp.add_argument("--patients", type=int, default=0, help="synthetic patients of the training seed (0: as many as the bundle was trained on)")
    sp.add_argument("--visits", type=int, default=0, help="training visits per synthetic patient (0: as the bundle was trained)")
    sp.add_argument("--steps", type=int, default=2000, help="generator steps (cosine learning rate to 0 over them)")
    sp.add_argument("--batch-size", type=int, default=32, help="images per generator step")
    sp.add_argument("--lr", type=float, default=1e-3, help="the generator's peak learning rate")
    sp.add_argument("--guide-steps", type=int, default=300, help="steps the guide learns real images alone first")
    sp.add_argument("--swaps", type=int, default=8, help="anonymized and counterfactual images (each) per step")
    sp.add_argument("--swap-weight", type=float, default=0.0, metavar="W",
                    help="weight of swap consistency: the fixed encoder must read back the synthetic identity from anonymized images and the source's kept vectors (0: off)")
    if research:
        from engine.research.cli import add_refine_switches

        add_refine_switches(sp)
    sp.add_argument("--seed", type=int, default=0, help="seed of the swaps and batches")
    sp.add_argument("--monitor-every", type=int, default=250, metavar="N", help="steps between progress lines (and unseen-patient checks)")
    sp.add_argument("--monitor-seed", type=int, default=2000, help="seed of the unseen patients whose SSIM is logged (not the evaluation's 1000)")
    sp.add_argument("--monitor-patients", type=int, default=64, help="unseen patients of the progress checks")
    sp.add_argument("--workers", type=int, default=0, help="processes making the synthetic patients")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    sp.add_argument("--no-gates", dest="gates", action="store_false", help="skip fitting the gates (the node refuses a bundle without them)")
    sp.set_defaults(func=cmd_refine, **REFERENCE_REFINE_SWITCHES)

    sp = esub.add_parser("evaluate", help="the paper's protocol with independent evaluator networks", formatter_class=defaults)
    sp.add_argument("--model", default="builtin:reference", metavar="NAME_OR_PATH", help="builtin:NAME or a bundle folder")
    sp.add_argument("--out", required=True, metavar="DIR", help="where report.json, report.md and grid.png go")
    sp.add_argument("--seed", type=int, default=1000, help="seed of the unseen population (must differ from the training seed)")
    sp.add_argument("--patients", type=int, default=100, help="patients in the re-identification population")
    sp.add_argument("--visits", type=int, default=10, help="visits per patient")
    sp.add_argument("--held-out", type=int, default=3, help="visits per patient kept from the identity evaluator and judged")
    sp.add_argument("--disease-patients", type=int, default=300, help="patients of the separate population the disease evaluator learns from")
    sp.add_argument("--epochs", type=int, default=30, help="identity evaluator epochs (the disease evaluator gets a third)")
    sp.add_argument("--backend", default="torch", help="torch | onnxruntime | tensorrt | auto")
    sp.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: torch's default); the evaluators' weights, and so the figures, depend on it")
    sp.add_argument("--write-bundle", action="store_true", help="store the metrics in the bundle's model.json")
    sp.add_argument("--gates-only", action="store_true", help="only what the gates reject, in-domain and out of domain (gates.json)")
    sp.add_argument("--draws", type=int, default=0, help="synthetic identities per image for the gates (0: the node's)")
    sp.add_argument("--retry", default="", metavar="GATES",
                    help="comma-separated gates whose failure earns another draw (medical, identity; empty: the node's)")
    sp.set_defaults(func=cmd_evaluate)

    sp = esub.add_parser("fit-gates", help="fit the gates every synthesised image must pass, into the bundle", formatter_class=defaults)
    sp.add_argument("--model", required=True, metavar="NAME_OR_PATH", help="the bundle (written in place)")
    sp.add_argument("--data", help="synthetic | hdf5:PATH | dicom:FOLDER,CSV (default: the synthetic patients the bundle was trained on)")
    sp.add_argument("--patients", type=int, default=1000, help="training-domain synthetic patients to fit on")
    sp.add_argument("--visits", type=int, default=8, help="visits per patient")
    sp.add_argument("--calibration-seed", type=int, default=5000, help="seed of the held-out synthetic patients the limits are set on")
    sp.add_argument("--domain-frr", type=float, default=0.01, help="false-rejection rate of the domain gate on held-out in-domain images")
    sp.add_argument("--medical-frr", type=float, default=0.01, help="false-rejection rate the medical limits aim at (never below probability 0.5)")
    sp.add_argument("--identity-quantile", type=float, default=0.01, help="the identity limit: this quantile of distances between different training patients")
    sp.add_argument("--medical-original", type=float, default=0.0, metavar="P",
                    help="hold back an original the medical classifier reads with probability below P (0: none; no draw can vouch for a finding it cannot tell)")
    sp.add_argument("--classifier-epochs", type=int, default=8, help="epochs of the medical gate's classifier")
    sp.add_argument("--classifier-blur", type=float, default=0.0, help="blur half the classifier's training images by up to this sigma (pixels), so that sharpness is no cue")
    sp.add_argument("--classifier-lr", type=float, default=3e-3, help="the classifier's peak learning rate (one-cycle)")
    sp.add_argument("--classifier-width", type=int, default=8,
                    help="channels of the classifier's first convolution (8, 16, 32, 64 in its four); a refit of another width trains from scratch")
    sp.add_argument("--decoder-epochs", type=int, default=20, help="epochs of the identity gate's decoder")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    sp.add_argument("--calibrate-only", action="store_true",
                    help="keep the fitted networks, identity metric and identity limit; set the other limits and every rate again")
    sp.add_argument("--refit-classifier", action="store_true",
                    help="keep the domain scorer and identity metric; train the classifier again (further from its fitted weights, or from scratch at another --classifier-width), then calibrate")
    sp.set_defaults(func=cmd_fit_gates)

    sp = esub.add_parser("export", help="export the inference graphs to ONNX (checked)")
    sp.add_argument("--model", default="builtin:reference", metavar="NAME_OR_PATH", help="builtin:NAME or a bundle folder")
    sp.add_argument("--graph", action="append", help="only this graph (repeatable)")
    sp.add_argument("--ship", action="store_true", help="write the node's graphs into the bundle itself (graphs/, fp32), as the node runs them without PyTorch")
    sp.set_defaults(func=cmd_export)

    sp = esub.add_parser("build", help="build and cache TensorRT engines ahead of time")
    sp.add_argument("--model", default="builtin:reference", metavar="NAME_OR_PATH", help="builtin:NAME or a bundle folder")
    sp.add_argument("--graph", action="append", help="only this graph (repeatable)")
    sp.add_argument("--profile", default="1,32,128", help="min,opt,max batch")
    sp.add_argument("--fp32", action="store_true", help="no FP16, even where the GPU supports it")
    sp.set_defaults(func=cmd_build)

    sp = esub.add_parser("triton-repo", help="write a Triton Inference Server model repository for a bundle", formatter_class=defaults)
    sp.add_argument("--model", default="builtin:reference", metavar="NAME_OR_PATH", help="the bundle")
    sp.add_argument("--out", required=True, metavar="DIR", help="the model repository (created; other models in it are left alone)")
    sp.add_argument("--name", default="", help="served as NAME_<graph> (default: the bundle's folder name); [[models]] triton_model = NAME")
    sp.add_argument("--version", type=int, default=1, help="Triton model version (an integer from 1)")
    sp.add_argument("--graph", action="append", help="only this graph (repeatable; default: anonymize and counterfactual)")
    sp.add_argument("--format", default="onnx", choices=("onnx", "plan"), help="onnx: the onnxruntime backend; plan: a TensorRT engine built here")
    sp.add_argument("--accelerator", default="none", choices=("none", "tensorrt"), help="onnx only: TensorRT as onnxruntime's GPU execution accelerator")
    sp.add_argument("--fp16", action="store_true", help="FP16 TensorRT (with --accelerator tensorrt or --format plan)")
    sp.add_argument("--max-batch", type=int, default=128, help="max_batch_size")
    sp.add_argument("--preferred", default="32,128", help="preferred batch sizes of the dynamic batcher")
    sp.add_argument("--queue-delay-us", type=int, default=1000, help="microseconds a request may wait for a batch to fill")
    sp.add_argument("--instances", type=int, default=1, help="model instances per GPU")
    sp.add_argument("--kind", default="gpu", choices=("gpu", "cpu"), help="instance kind")
    sp.add_argument("--trt-cache-path", default="", metavar="SERVER_DIR", help="a folder on the server where the TensorRT accelerator keeps its engines across restarts")
    sp.set_defaults(func=cmd_triton_repo)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="casemask")
    add_engine_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args()
    sys.exit(a.func(a))

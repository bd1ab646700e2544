"""Train several recipes side by side on one device within a time budget; judge them alike.

    casemask-research sweep --variants VARIANTS.json --out runs/sweep --budget 540 [--device cuda]

VARIANTS.json maps a name to TrainConfig fields, each laid over the reference recipe
(``engine.research.make_reference.REFERENCE``), for example::

    {"p1000": {"patients": 1000, "visits": 24},
     "p1000w32": {"patients": 1000, "visits": 24, "width": 32, "ssim_weight": 10}}

How it runs:

1. Each distinct population is made once, in blocks of 256 patients on parallel
   processes (``SyntheticPatients.batch(workers)``).
2. One process per variant. All of them time stage-1 and identity-VAE steps together
   (so the timing includes their sharing of the device), then each fits its number of
   stage-1 epochs to the budget (unless ``--epochs`` fixes them) and trains with
   :func:`engine.train.train`. A variant that still runs late stops at the end of an
   epoch and finishes with what it has.
3. One pair of evaluators (:func:`engine.evaluate.train_evaluators`, trained here while
   the variants train, or ``--evaluators``) judges every variant. Each variant writes
   ``OUT/NAME/bundle`` and ``OUT/NAME/report.json``; ``OUT/reports.json`` holds them all,
   and the ranking (targets met, then SSIM) is printed.

The v5 reference was chosen by the script this tool is a port of: four variants in 530 s
on one H100 (this port has run on the CPU only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from engine.data import CLASSES
from engine.evaluate import TARGETS, EvalConfig, Evaluators, meets
from engine.train import Dataset, TrainConfig, synthetic_split


def recipe(fields: dict, device: str) -> TrainConfig:
    """The reference recipe with ``fields`` laid over it (unknown fields are an error)."""
    from engine.research.make_reference import REFERENCE

    if "device" in fields:
        raise ValueError("a variant does not choose its device: every variant runs on --device")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"not TrainConfig fields: {', '.join(unknown)}")
    return dataclasses.replace(REFERENCE, **fields, device=device)


def make_population(cfg: TrainConfig, path: Path, workers: int) -> None:
    """The training and validation visits of ``cfg`` (:func:`engine.train.synthetic_split`), saved."""
    tr, va = synthetic_split(cfg, workers)
    torch.save({"train": (tr.images, tr.patient_ids, tr.labels), "val": (va.images, va.patient_ids, va.labels)}, path)


def data_key(cfg: TrainConfig) -> str:
    return f"data-{cfg.patients}x{cfg.visits}+{cfg.val_visits}-{cfg.image_size}-{cfg.seed}.pt"


def rank_key(report: dict) -> tuple[int, float]:
    return sum(meets(report, k) for k in TARGETS), report["ssim_reconstruction"]


def summary(name: str, r: dict) -> str:
    return (
        f"{name}: {rank_key(r)[0]}/{len(TARGETS)} targets, SSIM {r['ssim_reconstruction']:.3f}, disease original/recon/anonymized "
        f"{r['disease_acc_original']:.3f}/{r['disease_acc_reconstructed']:.3f}/{r['disease_acc_anonymized']:.3f}, flips {r['counterfactual_flip_rate']:.3f}, "
        f"re-id original/anonymized/counterfactual {r['reid_top1_original']:.3f}/{r['reid_top1_anonymized']:.3f}/{r['reid_top1_counterfactual']:.3f}, "
        f"AUC {r['verification_auc_anonymized']:.3f}"
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = json.loads(Path(args.variants).read_text())
    if not variants:
        raise SystemExit("casemask sweep: no variants")
    cfgs = {name: recipe(fields, args.device) for name, fields in variants.items()}
    eval_cfg = EvalConfig(**{**dataclasses.asdict(_reference_eval()), **json.loads(args.eval or "{}")})
    for cfg in {data_key(c): c for c in cfgs.values()}.values():
        t = time.time()
        make_population(cfg, out / data_key(cfg), args.workers or os.cpu_count() or 2)
        print(f"population {cfg.patients} x {cfg.visits}+{cfg.val_visits}: {time.time() - t:.1f} s", flush=True)
    ev_path = out / "evaluators.pt"
    for p in (out / "go", ev_path):
        p.unlink(missing_ok=True)
    spec = {"t0": t0, "budget": args.budget, "reserve": args.reserve, "epochs": args.epochs, "calibration": args.calibration_steps,
            "vae_seconds": args.vae_seconds, "eval": dataclasses.asdict(eval_cfg), "evaluators": str(ev_path)}
    procs = {}
    for name, cfg in cfgs.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "ready").unlink(missing_ok=True)
        (out / name / "spec.json").write_text(json.dumps({**spec, "config": dataclasses.asdict(cfg)}))
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, "-m", "engine.research.sweep", "--child", str(out / name)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    def waiting() -> int:  # variants neither ready nor ended
        return sum(p.poll() is None and not (out / n / "ready").exists() for n, p in procs.items())

    while waiting() and time.time() < t0 + args.budget / 4:
        time.sleep(0.2)
    (out / "go").touch()  # every variant is ready (or late): they time their steps together
    if args.evaluators:
        Evaluators.load(Path(args.evaluators), eval_cfg, next(iter(cfgs.values())).image_size).save(ev_path.with_suffix(".tmp"))
    else:
        from engine.evaluate import train_evaluators

        train_evaluators(eval_cfg, next(iter(cfgs.values())).image_size).save(ev_path.with_suffix(".tmp"))
    ev_path.with_suffix(".tmp").replace(ev_path)
    while any(p.poll() is None for p in procs.values()) and time.time() < t0 + args.budget + 30:
        time.sleep(0.5)
    reports = {}
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
            print(f"{name}: still running at the end of the budget; stopped", flush=True)
        f = out / name / "report.json"
        if f.exists():
            reports[name] = json.loads(f.read_text())
        else:
            print(f"{name}: no report (see {out / f'{name}.log'})", flush=True)
    (out / "reports.json").write_text(json.dumps(reports, indent=1) + "\n")
    for name in sorted(reports, key=lambda n: rank_key(reports[n]), reverse=True):
        print(summary(name, reports[name]), flush=True)
    print(f"sweep: {len(reports)} of {len(procs)} variants judged in {time.time() - t0:.0f} s", flush=True)
    return 0 if len(reports) == len(procs) else 1


def _reference_eval() -> EvalConfig:
    from engine.research.make_reference import REFERENCE_EVAL

    return REFERENCE_EVAL


class _Late(Exception):
    """Raised between epochs when a variant runs past its share of the budget."""


def child(folder: Path) -> int:
    from engine import bundle
    from engine.api import load_model
    from engine.evaluate import evaluate
    from engine.model import DisentanglementModel, ModelConfig
    from engine.train import guide_classifier, stage1_step, stage2_step, train

    spec = json.loads((folder / "spec.json").read_text())
    cfg = TrainConfig(**spec["config"])
    name, t0, budget = folder.name, spec["t0"], spec["budget"]
    stage1_end, stage2_end = t0 + budget - spec["reserve"], t0 + budget - spec["reserve"] / 2
    dev = torch.device(cfg.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.set_num_threads(max(1, cfg.threads))
    data = torch.load(folder.parent / data_key(cfg), weights_only=True)
    tr, va = Dataset(*data["train"]), Dataset(*data["val"])
    steps = len(tr.labels) // cfg.batch_size

    # Time the steps on a throwaway model, with every variant running.
    mcfg = ModelConfig(image_size=cfg.image_size, n_identities=int(tr.patient_ids.max()) + 1, width=cfg.width, other_dim=cfg.other_dim, generator=cfg.generator)
    m = DisentanglementModel(mcfg).to(dev)
    rib = torch.nn.Linear(mcfg.id_dim + mcfg.other_dim, 5).to(dev) if cfg.rib_fit else None
    guide = guide_classifier(n_classes=mcfg.n_classes).to(dev) if cfg.disease_guide else None
    extra = [p for mod in (rib, guide) if mod is not None for p in mod.parameters()]
    og = torch.optim.Adam([p for k, p in m.named_parameters() if not k.startswith(("discriminator", "vae"))] + extra, lr=1e-5)
    od, ov = torch.optim.Adam(m.discriminator.parameters(), lr=1e-5), torch.optim.Adam(m.vae.parameters(), lr=1e-5)
    b = slice(0, cfg.batch_size)
    x, pid, y = tr.images[b].to(dev), tr.patient_ids[b].to(dev), tr.labels[b].to(dev)
    ribs = (rib, torch.zeros(len(y), 5, device=dev)) if rib is not None else None
    ident = torch.randn(len(y), mcfg.id_dim, device=dev)
    (folder / "ready").touch()
    while not (folder.parent / "go").exists():
        time.sleep(0.1)

    def timed(step, n: int) -> float:
        warm = max(1, n // 3)
        for k in range(n):
            if k == warm:
                sync()
                start = time.time()
            step()
        sync()
        return (time.time() - start) / (n - warm)

    n = spec["calibration"]
    t1 = timed(lambda: stage1_step(m, x, pid, y, og, od, cfg, 1.0, ribs, guide), n)
    t2 = timed(lambda: stage2_step(m, ident, ov, cfg), 2 * n)
    del m, rib, guide, og, od, ov
    if spec["epochs"]:
        epochs = spec["epochs"]
    else:
        epochs = max(1, int((stage1_end - time.time()) / (steps * t1 * 1.05 + 1.0)))
    vae_epochs = max(1, round(spec["vae_seconds"] / t2 / steps))
    cfg = dataclasses.replace(cfg, epochs=epochs, vae_epochs=vae_epochs)
    print(f"{name}: {cfg}", flush=True)
    print(f"{name}: {t1 * 1e3:.1f} ms a stage-1 step, {t2 * 1e3:.2f} ms a VAE step -> {epochs} epochs ({epochs * steps} steps), {vae_epochs} VAE epochs", flush=True)

    done = {"stage1": 0, "stage2": 0}

    def on_epoch(stage: str, epoch: int, entry: dict) -> None:
        done[stage] = epoch
        if stage == "stage1" or epoch == cfg.vae_epochs:
            print(f"{name} {stage} epoch {epoch} at {time.time() - t0:.0f} s: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        late = time.time() > (stage1_end if stage == "stage1" else stage2_end)
        if late and epoch < (cfg.epochs if stage == "stage1" else cfg.vae_epochs):
            raise _Late(stage)

    for _ in range(3):
        try:
            model = train(cfg, folder / "run", data=(tr, va), on_epoch=on_epoch)
            break
        except _Late as late:
            stage = late.args[0]
            print(f"{name}: late in {stage} after {done[stage]} epochs; finishing with what is trained", flush=True)
            cfg = dataclasses.replace(cfg, **({"epochs": done[stage]} if stage == "stage1" else {"vae_epochs": done[stage]}))
    else:
        return 1
    trained_on = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = {"name": name, "description": f"sweep variant {name}", "classes": list(CLASSES), "modalities": ["CR", "DX"],
            "training": {**dataclasses.asdict(cfg), "data": "synthetic (engine.data.SyntheticPatients)", "trained_on": trained_on}}
    saved = bundle.save(model.cpu(), folder / "bundle", meta)
    ev_path, eval_cfg = Path(spec["evaluators"]), EvalConfig(**spec["eval"])
    while not ev_path.exists() and time.time() < t0 + budget + 20:
        time.sleep(0.5)
    evaluators = Evaluators.load(ev_path, eval_cfg, cfg.image_size)
    report = evaluate(load_model(saved.path, backend="torch"), folder / "eval", eval_cfg, evaluators=evaluators)
    report["sweep"] = {"epochs": cfg.epochs, "steps": cfg.epochs * steps, "vae_epochs": cfg.vae_epochs, "stage1_step_ms": t1 * 1e3, "seconds": round(time.time() - t0, 1)}
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{name}: judged at {time.time() - t0:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="casemask-research sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", metavar="JSON", help="file: name -> TrainConfig fields over the reference recipe")
    ap.add_argument("--out", metavar="DIR", help="populations, runs, bundles and reports")
    ap.add_argument("--budget", type=float, default=540.0, metavar="S", help="seconds for everything, from the start (default 540)")
    ap.add_argument("--reserve", type=float, default=150.0, metavar="S", help="seconds of the budget kept after stage 1 for the VAE and the evaluation (default 150)")
    ap.add_argument("--epochs", type=int, default=0, help="stage-1 epochs for every variant (default 0: fitted to the budget)")
    ap.add_argument("--vae-seconds", type=float, default=45.0, metavar="S", help="identity-VAE training time to aim at (default 45)")
    ap.add_argument("--calibration-steps", type=int, default=45, metavar="N", help="steps timed before the epochs are fitted (default 45)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when present")
    ap.add_argument("--evaluators", metavar="PT", help="evaluators saved by Evaluators.save for the same evaluation settings (default: train them)")
    ap.add_argument("--eval", metavar="JSON", help="EvalConfig fields over the reference evaluation (seed 1000, 2 threads), e.g. '{\"patients\": 50}'")
    ap.add_argument("--workers", type=int, default=0, help="processes that make the populations (default: one per CPU)")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        try:
            return child(Path(args.child))
        except Exception:
            traceback.print_exc()
            return 1
    if not args.variants or not args.out:
        ap.error("--variants and --out are required")
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"casemask sweep: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())

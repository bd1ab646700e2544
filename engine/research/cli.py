"""``casemask-research``: the engine's commands with the research switches, and the
research tools. Not part of the shipped ``casemask`` command; see docs/engine-research.md.

    casemask-research train --out DIR [--generator conv|fourier] [--rib-fit W] [--privacy reverse|uniform]
                            [--disease-guide W] [--width N] [--ssim-weight W] ...
    casemask-research refine --out DIR [--identity-guide W] [--disease-guide W] ...
    casemask-research synth | evaluate | export | build ...     (as ``casemask engine``)
    casemask-research sweep ...              several recipes side by side in a time budget
    casemask-research autoencoder-trial ...  a decoder design as a plain autoencoder
    casemask-research make-reference ...     rebuild the reference bundle from scratch
    casemask-research gate-findings ...      the medical gate's failures against what the images show
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import REFERENCE_REFINE_SWITCHES, REFERENCE_TRAIN_SWITCHES, add_engine_commands

# Tools that parse their own arguments: subcommand -> module with main(argv).
TOOLS = {
    "sweep": ("engine.research.sweep", "several recipes trained side by side on one device within a time budget, judged by one pair of evaluators"),
    "autoencoder-trial": ("engine.research.autoencoder_trial", "a decoder design as a plain autoencoder: SSIM on unseen patients and the latent's read-out"),
    "make-reference": ("engine.research.make_reference", "rebuild the reference bundle: training, four refinements, gates, evaluation"),
    "gate-findings": ("engine.research.gate_findings", "the medical gate's failures: a classifier's misreadings, or findings the image does not show"),
}


def add_train_switches(sp: argparse.ArgumentParser) -> None:
    """The switches the reference recipe fixes in ``casemask engine train``."""
    ref = REFERENCE_TRAIN_SWITCHES
    sp.add_argument("--generator", default=ref["generator"], choices=("conv", "fourier"),
                    help="conv: upsampling convolutions; fourier (the reference model's): latent-modulated, with quadratic-phase sinusoids")
    sp.add_argument("--rib-fit", type=float, default=ref["rib_fit"], metavar="W",
                    help="weight of a label-free loss that asks the latent for the ribs as a matched-filter fit reads them (0: off)")
    sp.add_argument("--privacy", default=ref["privacy"], choices=("reverse", "uniform"),
                    help="reverse: the encoder maximizes the privacy heads' error (gradient reversal); uniform: it makes their prediction uniform (bounded at chance)")
    sp.add_argument("--disease-guide", type=float, default=ref["disease_guide"], metavar="W",
                    help="weight of a loss asking generated images to show their disease to a classifier that learns from real images only (0: off)")
    sp.add_argument("--width", type=int, default=ref["width"], help="channels of the first encoder layer (the network's width)")
    sp.add_argument("--ssim-weight", type=float, default=ref["ssim_weight"], metavar="W", help="weight of 1 - SSIM in the reconstruction loss, beside L1")


def add_refine_switches(sp: argparse.ArgumentParser) -> None:
    """The switches the reference recipe fixes in ``casemask engine refine``."""
    ref = REFERENCE_REFINE_SWITCHES
    sp.add_argument("--disease-guide", type=float, default=ref["disease_guide"], metavar="W",
                    help="weight of the loss asking reconstructions, anonymized images and counterfactuals to show their disease to a classifier of real images (0: off, not advised)")
    sp.add_argument("--identity-guide", type=float, default=ref["identity_guide"], metavar="W",
                    help="weight of the re-identification guard: a classifier of the training patients must not find the source patient in anonymized images (0: off)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casemask-research", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="engine_command", metavar="SUBCOMMAND", required=True)
    add_engine_commands(sub, research=True)
    for name, (module, text) in TOOLS.items():
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.set_defaults(tool=module)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 1 the operation failed, 2 bad usage."""
    import importlib
    import logging

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:  # the tool parses the rest itself (its own --help)
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""argparse options of the labeller choice, shared by generate and relabel.

``--labeler pcc|dd|fused``, ``--save-all-labelers`` and one ``--dd-<field>`` option per
:class:`~pccfast.core.dd.DDConfig` field (its ``ignore_index`` is PCC's ``--ignore-index``,
which the label set sets). :func:`labeler_choice_from_args` builds the
:class:`~pccfast.core.dd.LabelerChoice`; a bad value is a ``ValueError`` naming the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from pccfast.core.dd import LABELERS, DDConfig, LabelerChoice

__all__ = ["DD_HELP", "add_labeler_arguments", "labeler_choice_from_args"]

DD_HELP = {
    "affinity_scale": "Dataset Diffusion: its self-attention affinity is taken at the labelling grid divided by "
    "this (the 'half' grid: 32x32 for SD at 512x512)",
    "class_scale": "Dataset Diffusion: its class cross-attention is taken at the labelling grid divided by this "
    "(the 'quarter' grid: 16x16 for SD at 512x512)",
    "power": "Dataset Diffusion: class maps are propagated with the affinity raised to this power",
    "threshold": "Dataset Diffusion: a pixel whose best normalised class score is at least this takes the class",
    "uncertain_threshold": "Dataset Diffusion: scores from this up to --dd-threshold are uncertain (255), "
    "lower ones background",
    "step_start": "Dataset Diffusion: denoising call i of n counts when step-start * n <= i < step-end * n",
    "step_end": "Dataset Diffusion: see --dd-step-start (0 and 1: every call)",
}
_SKIP = ("ignore_index",)  # PCC's --ignore-index (the label set's) is used


def _flag(name: str) -> str:
    return "--dd-" + name.replace("_", "-")


def add_labeler_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--labeler``, ``--save-all-labelers`` and the ``--dd-*`` options; returns the group."""
    g = parser.add_argument_group("labeller choice (PCC, Dataset Diffusion, or both fused)")
    g.add_argument("--labeler", choices=LABELERS, default="pcc",
                   help="which masks go to SegmentationClass/: 'pcc' (PCC segmentation), 'dd' (Dataset Diffusion's "
                   "rule: self-attention affinity power times class cross-attention, thresholds), or 'fused' (a "
                   "pixel keeps its label where both agree, else 255) (default: %(default)s)")
    g.add_argument("--save-all-labelers", action="store_true",
                   help="also write SegmentationClassPCC/<id>.png and SegmentationClassDD/<id>.png, each labeller's "
                   "own mask (runs both)")
    hints = typing.get_type_hints(DDConfig)
    defaults = DDConfig()
    for f in dataclasses.fields(DDConfig):
        if f.name in _SKIP:
            continue
        kind = hints[f.name]
        g.add_argument(_flag(f.name), dest="dd_" + f.name, type=kind, default=None, metavar="N" if kind is int else "X",
                       help=f"{DD_HELP[f.name]} (default: {getattr(defaults, f.name)})")
    return g


def labeler_choice_from_args(args: argparse.Namespace) -> LabelerChoice:
    """The ``LabelerChoice`` of the command line (DDConfig defaults for the options not given).

    Raises:
        ValueError: a ``--dd-*`` value out of range (the message names the option).
    """
    changes = {f.name: getattr(args, "dd_" + f.name) for f in dataclasses.fields(DDConfig)
               if f.name not in _SKIP and getattr(args, "dd_" + f.name, None) is not None}
    try:
        dd = DDConfig(**changes)
    except ValueError as e:
        text = str(e)
        for f in dataclasses.fields(DDConfig):
            text = text.replace(f"`{f.name}`", f"`{_flag(f.name)}`")
        raise ValueError(text) from None
    return LabelerChoice(labeler=args.labeler, dd=dd, save_all=bool(args.save_all_labelers))

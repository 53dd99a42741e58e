"""``python -m pccfast.relabel``: saved captures (+ images) -> masks or a dataset, with other labeller settings."""
from __future__ import annotations

import argparse
import os
import sys

from pccfast.cli.labelers import add_labeler_arguments, labeler_choice_from_args
from pccfast.cli.common import (
    add_device_arguments, add_run_arguments, check_scaleout_arguments, config_from_args, device_from_args, fail,
    label_set_from_args, one_line_errors, positive_int, run_and_report,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.relabel",
        description="Label saved captures again (e.g. with other labeller settings) without running Stable "
        "Diffusion: CAPTURES/<id>.safetensors (+ IMAGES/<id>.jpg|.jpeg|.png for captures that hold no image) -> "
        "OUT/SegmentationClass/<id>.png (8-bit palette PNG, 255 = uncertain); with --as-dataset a complete dataset. "
        "--labeler dd or fused needs captures that hold Dataset Diffusion's tensors (generate --save-captures with "
        "--labeler dd, fused or --save-all-labelers). "
        "The label set is the one the captures record; captures that hold their decoded image (written by "
        "generate --save-captures since capture format_version 2) give generate's masks exactly. "
        "Re-running the same command resumes where it stopped. "
        "Bad inputs are reported one line each and skipped; a batch that fails is run again item by item; "
        "the exit status is 1 if anything failed.",
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--captures", required=True, metavar="DIR",
                   help="folder of <id>.safetensors captures (written by python -m pccfast.generate --save-captures); "
                   "a webdataset or parquet dataset keeps them inside its tars or parquet files: export it with "
                   "python -m pccfast.export SRC --to voc OUT first and pass OUT/captures")
    g.add_argument("--images", default=None, metavar="DIR",
                   help="folder of the images <id>.jpg, <id>.jpeg or <id>.png (sides multiples of the capture grid), "
                   "or a dataset folder holding JPEGImages/; used for captures that hold no image of their own "
                   "(default: none, and every capture has to hold its image)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output dataset folder: SegmentationClass/<id>.png (and SegmentationClassBlocky/) and "
                   "labelset.json (an existing one has to name the same label set)")
    g.add_argument("--as-dataset", action="store_true",
                   help="write a complete dataset into --out, read like a generated one: also JPEGImages/<id>.jpg "
                   "(linked or copied from --images, or encoded from the capture's image), "
                   "ImageSets/Segmentation/train.txt and manifest.jsonl (each capture's prompt, classes, seed, "
                   "model, steps); an id is done when its manifest record, image and mask exist")
    g.add_argument("--save-blocky", action="store_true",
                   help="also write SegmentationClassBlocky/<id>.png: the blocky mask before refinement, at image size")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N captures, sorted by id (default: all)")
    g.add_argument("--overwrite", action="store_true",
                   help="relabel ids whose outputs exist (default: skip them, so a re-run resumes)")
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set: voc, coco, or a JSON/YAML file with 'classes' (background first) and optional "
                   "'texts', 'palette', 'ignore_index'; captures of another set fail one by one (default: the set "
                   "the captures record, which all of them have to share)")
    r = p.add_argument_group("execution")
    r.add_argument("--batch", type=positive_int, default=8, metavar="N",
                   help="captures per batch; captures of one size are labelled together (default: %(default)s)")
    add_device_arguments(r, dtype=False)
    r.add_argument("--io-threads", type=int, default=2, metavar="N",
                   help="threads reading captures and images; with any, the next batch is read while this one is "
                   "labelled and masks are written behind it; 0 = all in line (default: %(default)s)")
    add_labeler_arguments(p)
    add_run_arguments(p, "captures (in id order)")
    return p


def _has_files(folder: str, exts: tuple, any_case: bool = False) -> bool:
    return any((n.lower() if any_case else n).endswith(exts) and not n.startswith(".") for n in os.listdir(folder))


def _refuse_packed(option: str, folder: str, what: str) -> None:
    """ValueError if ``folder`` (or the dataset holding it, for its shards/ or data/ folder) is a
    webdataset or parquet dataset: relabel reads files, which those layouts keep inside tars or
    parquet files."""
    from pccfast.data.layout import IMAGES, PARQUETS, TARS, detect_layout

    parent = os.path.dirname(os.path.abspath(folder))
    for root in (folder,) + ((parent,) if os.path.basename(os.path.abspath(folder)) in (TARS, PARQUETS) else ()):
        try:
            layout = detect_layout(root)
        except ValueError:
            continue
        if layout != "voc" and not (option == "images" and os.path.isdir(os.path.join(root, IMAGES))):
            kind = "tars" if layout == "webdataset" else "parquet files"
            raise ValueError(f"`--{option}` {folder!r} {'is' if root == folder else 'is in'} a {layout} dataset, whose {what} are inside its {kind}, and "
                             f"relabel reads files: run `python -m pccfast.export {root} --to voc OUT` first, then "
                             f"relabel with `--{option} OUT{'/captures' if option == 'captures' else ''}`")


@one_line_errors(resumable=build_parser)
def main(argv: list[str] | None = None) -> int:
    from pccfast.runs.plan import parse_shard
    from pccfast.runs.relabel import relabel_dir

    args = build_parser().parse_args(argv)
    try:
        label_set = None if args.label_set is None else label_set_from_args(args)
        cfg, device = config_from_args(args), device_from_args(args)
        labeling = labeler_choice_from_args(args)
        if args.workers is not None and args.ray is None:  # what --workers meant before the run engine
            print(f"warning: --workers without --ray sets the reader threads, which are --io-threads now; "
                  f"use --io-threads {args.workers} (--workers is the number of Ray workers with --ray)", file=sys.stderr)
            args.io_threads, args.workers = args.workers, None
        if args.io_threads < 0:
            raise ValueError(f"`--io-threads` has to be >= 0 but is {args.io_threads}")
        check_scaleout_arguments(args)
        shard = parse_shard(args.shard)
        for name in ("captures", "images"):
            d = getattr(args, name)
            if d is not None and not os.path.isdir(d):
                raise ValueError(f"`--{name}` has to be a directory but {d!r} is not one")
        if args.images is not None and not _has_files(args.images, (".jpg", ".jpeg", ".png"), any_case=True):
            _refuse_packed("images", args.images, "images")
        if not _has_files(args.captures, (".safetensors",)):
            _refuse_packed("captures", args.captures, "captures")
            hint = os.path.join(args.captures, "captures")
            hint = f" (did you mean {hint}?)" if os.path.isdir(hint) else ""
            raise ValueError(f"`--captures` {args.captures!r} holds no .safetensors files{hint}")
    except ValueError as e:
        fail(str(e))
    return run_and_report(lambda: relabel_dir(
        args.captures, args.images, args.out, cfg, batch=args.batch, device=device, save_blocky=args.save_blocky,
        label_set=label_set, as_dataset=args.as_dataset, limit=args.limit, overwrite=args.overwrite,
        workers=args.io_threads, shard=shard, ray=args.ray, ray_workers=args.workers, progress=not args.no_progress,
        labeling=labeling),
        "samples" if args.as_dataset else "masks", args.out)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pccfast.train DATASET --val VOC --out RUN_DIR``: train a DeepLabv3 on a dataset, score it on real
images; ``--predict CKPT IMAGES --out MASKS`` writes a checkpoint's masks."""
from __future__ import annotations

import argparse
import sys

from pccfast.cli.common import device_from_args, fail, one_line_errors, positive_int, report_run
from pccfast.data.labelsets import get_label_set
from pccfast.training.models import ARCHS
from pccfast.training.recipe import PRESETS, preset

__all__ = ["build_parser", "main"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"has to be a positive number but is {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"has to be a number between 0 and 1 (e.g. 0.999) but is {text!r}")
    return value


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        lo = hi = -1.0
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"has to be MIN,MAX with 0 < MIN <= MAX (e.g. 0.5,2.0) but is {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.train",
        description="Train a DeepLabv3 segmenter on a dataset (a pccfast dataset or any folder with JPEGImages/ and "
        "SegmentationClass/) and score it on --val (a real Pascal VOC2012 folder, val.txt ids) with pccfast's "
        "VOC-convention mIoU: the protocol papers report. Checkpoints are written atomically to --out; running the "
        "same command again resumes exactly. Under torchrun every GPU runs one process (DDP). With --predict, "
        "write a checkpoint's masks for a folder of images instead.",
    )
    g = p.add_argument_group("data and output")
    g.add_argument("dataset", nargs="?", default=None, metavar="DATASET",
                   help="training folder: ROOT/JPEGImages/<id>.jpg + ROOT/SegmentationClass/<id>.png (ids of "
                   "ImageSets/Segmentation/train.txt when present, else every mask; ROOT/VOCdevkit/VOC2012 is found), "
                   "or a pccfast dataset in the webdataset or parquet layout (all its committed samples)")
    g.add_argument("--val", default=None, metavar="DIR",
                   help="validation folder: a VOC2012 folder (JPEGImages, SegmentationClass, "
                   "ImageSets/Segmentation/val.txt) or any pccfast dataset, VOC, webdataset or parquet layout (all its "
                   "samples); default: no evaluation")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="run folder (last.pt, best.pt, log.jsonl, curves.png, train.json); with --predict the "
                   "masks' dataset folder (SegmentationClass/<id>.png, labelset.json)")
    g.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="classes: voc, coco or a JSON/YAML label-set file (default: DATASET's labelset.json if "
                   "present, else voc)")
    r = p.add_argument_group("recipe (a preset, then any option given here)")
    r.add_argument("--preset", default="syntagen", choices=sorted(PRESETS),
                   help="syntagen: the SyntaGen challenge (ResNet-50, <= 10,000 pairs, 100k iterations, batch 8, "
                   "512 crops, SGD 0.01 poly); dd: Dataset Diffusion's mmseg schedule (ResNet-101, AdamW 1e-4, "
                   "backbone lr x0.1, grad clip 0.01, 20k iterations, batch 4, eval every 1000) (default: %(default)s)")
    r.add_argument("--arch", default=None, choices=ARCHS,
                   help="model; deeplabv3_mobilenet_v3_large is the small one for quick runs (default: the preset's)")
    r.add_argument("--iters", type=positive_int, default=None, metavar="N", help="optimiser steps (default: the preset's)")
    r.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="global batch, split over torchrun's processes; with --predict, images per batch "
                   "(default: the preset's; 4 for --predict)")
    r.add_argument("--crop", type=positive_int, default=None, metavar="PX",
                   help="square training crop side (default: the preset's)")
    r.add_argument("--lr", type=_positive_float, default=None, metavar="X",
                   help="base learning rate of the poly schedule, which ends at the preset's floor (syntagen 1e-4; 0 for "
                   "a smaller --lr) (default: the preset's)")
    r.add_argument("--max-pairs", type=positive_int, default=None, metavar="N",
                   help="train on at most the first N pairs by id (default: the preset's; syntagen 10,000)")
    r.add_argument("--ema-decay", type=_fraction, default=None, metavar="D",
                   help="keep an exponential moving average of the weights (e.g. 0.999) and evaluate, keep the best "
                   "and predict with it (default: off)")
    r.add_argument("--bn-momentum", type=_fraction, default=None, metavar="M",
                   help="momentum of every batch-norm layer's running statistics; 0.1 helps short runs of the "
                   "MobileNetV3 model, whose own 0.01 needs thousands of steps (default: the model's)")
    r.add_argument("--scale-range", type=_range, default=None, metavar="MIN,MAX",
                   help="random resize: each training image's short side becomes crop x U(MIN, MAX) before the "
                   "crop (default: the preset's, 0.5,2.0 as mmsegmentation's ratio_range)")
    r.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the data order, augmentation, initialisation and dropout (default: 0)")
    r.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="evaluate on --val every N iterations and at the end (default: the preset's)")
    r.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="write last.pt every N iterations (also at Ctrl-C and at the end) (default: 1000)")
    r.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                   help="one log.jsonl line (mean loss, lr, img/s) every N iterations (default: 20)")
    r.add_argument("--backbone-weights", default="auto", metavar="PATH|auto|none",
                   help="auto: torchvision's ImageNet weights (needs torchvision and a network); PATH: a torchvision "
                   "ImageNet backbone file (e.g. resnet50-0676ba61.pth) or DeepLabv3 checkpoint, loaded by name; "
                   "none: from scratch (much worse) (default: %(default)s)")
    x = p.add_argument_group("execution")
    x.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device: cpu, cuda, cuda:1 (default: cuda if available, else cpu; under torchrun each "
                   "process takes the GPU of its LOCAL_RANK)")
    x.add_argument("--workers", type=int, default=4, metavar="N",
                   help="data-loading processes; 0 reads in the training process (default: %(default)s)")
    x.add_argument("--no-amp", action="store_true", help="no float16 mixed precision on CUDA (it is never used on the CPU)")
    x.add_argument("--implementation", default="auto", choices=["auto", "torchvision", "builtin"],
                   help="auto: torchvision's models where torchvision imports, else pccfast's built-in copies (same "
                   "parameter names); the choice is logged (default: %(default)s)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar (log lines are still printed)")
    q = p.add_argument_group("prediction")
    q.add_argument("--predict", nargs=2, default=None, metavar=("CKPT", "IMAGES"),
                   help="write CKPT's (last.pt or best.pt) masks for every image of IMAGES (a folder, or a dataset's "
                   "JPEGImages/) to --out/SegmentationClass/<id>.png, for python -m pccfast.evaluate")
    q.add_argument("--overwrite", action="store_true",
                   help="with --predict, redo masks that exist (default: skip them, so a re-run resumes)")
    return p


def _recipe(args: argparse.Namespace):
    base = PRESETS[args.preset]
    # the schedule's floor stays the preset's (as mmsegmentation's eta_min), or 0 under a smaller --lr
    min_lr = 0.0 if args.lr is not None and args.lr < base.min_lr else None
    cfg = preset(args.preset, min_lr=min_lr, arch=args.arch, iters=args.iters, batch=args.batch, crop=args.crop, lr=args.lr,
                 max_pairs=args.max_pairs, ema_decay=args.ema_decay, bn_momentum=args.bn_momentum, seed=args.seed, eval_every=args.eval_every,
                 checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    if args.scale_range is not None:
        cfg = cfg.replace(scale_min=args.scale_range[0], scale_max=args.scale_range[1])
    if args.no_amp:
        cfg = cfg.replace(amp=False)
    return cfg


@one_line_errors(resumable=build_parser)
def main(argv: list[str] | None = None) -> int:
    """Train (or predict); exit status 2 with one ``error:`` line for any bad folder, option or weights file,
    130 at Ctrl-C (after writing the checkpoint)."""
    args = build_parser().parse_args(argv)
    try:
        device = device_from_args(args)
        if args.workers < 0:
            raise ValueError(f"`--workers` has to be 0 or more but is {args.workers}")
        if args.predict:
            if args.dataset is not None:
                raise ValueError(f"`--predict` takes no DATASET (got {args.dataset!r}): "
                                 "python -m pccfast.train --predict CKPT IMAGES --out MASKS")
            from pccfast.training.predict import predict

            ckpt, images = args.predict
            report = predict(ckpt, images, args.out, device=device, batch=args.batch or 4,
                             progress=not args.no_progress, overwrite=args.overwrite)
            return report_run(report, "masks", args.out)
        if args.dataset is None:
            raise ValueError("DATASET is missing: python -m pccfast.train DATASET [--val VOC2012] --out RUN_DIR")
        cfg = _recipe(args)
        from pccfast.training.datasets import dataset_label_set
        from pccfast.training.loop import train

        label_set = get_label_set(args.label_set or dataset_label_set(args.dataset))
        result = train(args.dataset, args.out, cfg, label_set, val=args.val, backbone_weights=args.backbone_weights,
                       device=device, workers=args.workers, progress=not args.no_progress,
                       implementation=args.implementation, log=lambda line: print(line, file=sys.stderr))
    except (ValueError, ImportError) as e:
        fail(e)
    best = "" if result.best_miou is None else f"; best val mIoU {100 * result.best_miou:.2f}"
    print(f"trained {result.iteration:,} iterations into {result.out}{best}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

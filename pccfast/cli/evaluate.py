"""``python -m pccfast.evaluate PRED GT``: per-class IoU, mIoU and accuracy of masks against ground truth."""
from __future__ import annotations

import argparse
import json
import sys

from pccfast.cli.common import one_line_errors, report_error
from pccfast.data.fileio import atomic_write_bytes, check_output_file, write_output
from pccfast.data.labelsets import get_label_set
from pccfast.tools.evaluate import default_label_set, evaluate_dirs, masks_name

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.evaluate",
        description="Score predicted masks against ground-truth masks: per-class IoU and accuracy, mIoU and pixel "
        "accuracy (VOC convention: ground-truth 255 ignored; a prediction of 255 or any label outside the set "
        "counts as wrong). Either side is a folder of PNG masks, a VOC dataset root (its SegmentationClass/) or a "
        "pccfast dataset in the webdataset (shards/*.tar) or parquet (data/*.parquet) layout. Masks are paired by "
        "id: the file name <id>.png, or a dataset sample's id.",
    )
    p.add_argument("pred_dir", metavar="PRED_DIR",
                   help="predicted masks: a folder of <id>.png, or a pccfast dataset in any layout (voc, webdataset, "
                   "parquet)")
    p.add_argument("gt_dir", metavar="GT_DIR",
                   help="ground-truth masks, e.g. VOC2012/SegmentationClass, or a pccfast dataset in any layout")
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set: voc, coco or a JSON/YAML file (default: PRED_DIR's dataset labelset.json if "
                   "present, else the label set its parquet files record, else voc)")
    p.add_argument("--ids", default=None, metavar="FILE",
                   help="score only the ids listed in FILE, one per line (e.g. ImageSets/Segmentation/val.txt)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report (scores, confusion matrix, "
                   "unmatched ids) as JSON to FILE")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """The table on stdout; exit status 2 with one ``error:`` line for a missing folder, a bad
    label set or mask, an empty dataset, parquet files without pyarrow, or a ``--json`` that
    cannot be written (checked before any mask is read)."""
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            check_output_file(args.json, "--json")
        ls = get_label_set(args.label_set or default_label_set(args.pred_dir))
        ids = None
        if args.ids:
            with open(args.ids, encoding="utf-8") as f:
                ids = [s.split()[0] for s in f if s.strip()]
        report = evaluate_dirs(args.pred_dir, args.gt_dir, ls, ids=ids)
        if report.n_images == 0:
            raise ValueError(f"no image is in both {masks_name(args.pred_dir)} and {masks_name(args.gt_dir)}")
    except (ValueError, OSError, ImportError) as e:
        return report_error(e)
    print(f"label set: {ls.name}")
    print(report.table())
    if args.json:
        text = json.dumps(report.to_json(), indent=1) + "\n"
        write_output(args.json, lambda: atomic_write_bytes(args.json, text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

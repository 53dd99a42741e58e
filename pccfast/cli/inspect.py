"""``python -m pccfast.inspect DATASET``: stats, suspicious images, a contact sheet or an HTML page."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pccfast.cli.common import one_line_errors, report_error
from pccfast.data.fileio import atomic_write_bytes, check_output_file, write_output
from pccfast.tools.inspection import contact_sheet, dataset_label_set, dataset_stats, find_samples, save_sheet, write_html

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.inspect",
        description="Inspect a generated dataset in any layout (voc, webdataset, parquet): print class shares, "
        "uncertain shares and suspicious images; draw a contact sheet (PNG) or write an HTML page.",
    )
    p.add_argument("dataset", metavar="DATASET",
                   help="dataset folder written by python -m pccfast.generate or export: the VOC layout "
                   "(SegmentationClass/, JPEGImages/), WebDataset tars (shards/*.tar) or Parquet files (data/*.parquet, "
                   "needs pyarrow); tar and parquet datasets show their committed samples")
    p.add_argument("--out", default=None, metavar="FILE.png|FILE.html",
                   help="contact sheet (.png) or HTML page (.html; it links a VOC dataset's files and embeds a tar or "
                   "parquet dataset's images); default: stats only")
    p.add_argument("--limit", type=int, default=24, metavar="N",
                   help="rows on the sheet / page (default: %(default)s; stats always cover every mask)")
    p.add_argument("--suspicious", action="store_true", help="show only suspicious images on the sheet / page")
    p.add_argument("--size", type=int, default=160, metavar="PX", help="thumbnail size in pixels (default: %(default)s)")
    p.add_argument("--uncertain-max", type=float, default=0.9, metavar="SHARE",
                   help="a mask with a larger uncertain share is suspicious (default: %(default)s)")
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set (default: the dataset's labelset.json, else the one its parquet files record, "
                   "else voc)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the stats (per class, per image) as JSON")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """Stats on stdout; exit status 2 with one ``error:`` line for bad options, a folder that is
    not a dataset, an empty tar or parquet dataset, parquet files without pyarrow, or an output
    that cannot be written (checked before the masks are read)."""
    args = build_parser().parse_args(argv)
    try:
        if args.limit < 0 or args.size < 8:
            raise ValueError(f"`--limit` has to be >= 0 and `--size` >= 8 but are {args.limit} and {args.size}")
        if args.out and not args.out.lower().endswith((".png", ".html", ".htm")):
            raise ValueError(f"`--out` has to end in .png or .html but is {args.out!r}")
        if args.out and args.json and os.path.abspath(args.out) == os.path.abspath(args.json):
            raise ValueError(f"`--out` and `--json` have to be different files but both are {args.out!r}")
        for option, path in (("--json", args.json), ("--out", args.out)):
            if path:
                check_output_file(path, option)
        ls = dataset_label_set(args.dataset, args.label_set)
        samples = find_samples(args.dataset)
        stats = dataset_stats(samples, ls, args.uncertain_max)
    except (ValueError, OSError, ImportError) as e:
        return report_error(e)
    print(stats.summary(args.dataset))
    if args.json:
        text = json.dumps(stats.to_json(), indent=1) + "\n"
        write_output(args.json, lambda: atomic_write_bytes(args.json, text.encode()))
    if args.out:
        bad = {s.id for s in stats.suspicious}
        rows = [s for s in samples if not args.suspicious or s.id in bad][: args.limit]
        title = f"{os.path.abspath(args.dataset)}: {len(rows)} of {len(samples)} images, label set {ls.name}"
        if args.out.lower().endswith(".png"):
            sheet = contact_sheet(rows, ls, size=args.size, stats={s.id: s for s in stats.images}, title=title)
            write_output(args.out, lambda: save_sheet(sheet, args.out))
        else:
            write_output(args.out, lambda: write_html(args.out, rows, stats, size=args.size, title=title))
        print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

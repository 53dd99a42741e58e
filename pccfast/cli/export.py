"""``python -m pccfast.export SRC --to voc|webdataset|parquet OUT``: a dataset in another layout."""
from __future__ import annotations

import argparse
import sys

from pccfast.cli.common import one_line_errors, positive_int, run_and_report
from pccfast.data.layout import FORMATS

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.export",
        description="Copy a pccfast dataset into another layout: VOC folders (JPEGImages/, SegmentationClass/), "
        "WebDataset tar shards (shards/*.tar, shards.json) or Parquet files for Hugging Face datasets "
        "(data/*.parquet). "
        "The source layout is detected. Images, masks and records are copied byte for byte (JPEGs are not "
        "re-encoded). Streaming, a batch at a time; re-running the same command resumes an interrupted export.",
    )
    p.add_argument("src", metavar="SRC", help="the dataset folder to read (any of the three layouts; only its "
                   "committed samples, those in its manifest, are read)")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="the layout to write: voc, webdataset (tar shards) or parquet (needs pip install "
                   "'pccfast[parquet]')")
    p.add_argument("out", metavar="OUT", help="the folder to write (a new folder, or one this export began; "
                   "it also gets labelset.json, run.json and manifest.jsonl)")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="samples per tar (webdataset) or rows per file (parquet, where a file is also what is "
                   "held in memory and lost if the export is killed) (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=64, metavar="N",
                   help="samples read and written per batch for voc and webdataset (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-export samples already in OUT whose records differ from SRC's (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (errors are still printed)")
    return p


@one_line_errors(resumable=build_parser)
def main(argv: list[str] | None = None) -> int:
    from pccfast.runs.export import run_export

    args = build_parser().parse_args(argv)
    return run_and_report(lambda: run_export(args.src, args.to, args.out, shard_size=args.shard_size,
                                             batch=args.batch, overwrite=args.overwrite,
                                             progress=not args.no_progress), "samples", args.out)


if __name__ == "__main__":
    sys.exit(main())

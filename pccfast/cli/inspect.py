"""``python -m pccfast.inspect DATASET``: stats, suspicious images, a contact sheet or an HTML page."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile

from pccfast.cli.common import one_line_errors, report_error
from pccfast.data.fileio import atomic_write_bytes
from pccfast.tools.inspection import contact_sheet, dataset_label_set, dataset_stats, find_samples, save_sheet, write_html

__all__ = ["build_parser", "check_output_file", "write_output", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.inspect",
        description="Inspect a generated dataset (VOC layout): print class shares, uncertain shares and suspicious "
        "images; draw a contact sheet (PNG) or write an HTML page.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset folder written by python -m pccfast.generate")
    p.add_argument("--out", default=None, metavar="FILE.png|FILE.html",
                   help="contact sheet (.png) or HTML page (.html); default: stats only")
    p.add_argument("--limit", type=int, default=24, metavar="N",
                   help="rows on the sheet / page (default: %(default)s; stats always cover every mask)")
    p.add_argument("--suspicious", action="store_true", help="show only suspicious images on the sheet / page")
    p.add_argument("--size", type=int, default=160, metavar="PX", help="thumbnail size in pixels (default: %(default)s)")
    p.add_argument("--uncertain-max", type=float, default=0.9, metavar="SHARE",
                   help="a mask with a larger uncertain share is suspicious (default: %(default)s)")
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set (default: the dataset's labelset.json, else voc)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the stats (per class, per image) as JSON")
    return p


def check_output_file(path: str, option: str) -> None:
    """Before any work: OSError (``FILE: reason``) unless ``path`` can be written as a new or
    replaced file in a folder that exists. Proven with a temporary file that is removed at
    once, so a read-only or unwritable folder fails here and nothing is left behind; the
    folder is not created (a mistyped path should not make folders)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"`{option}` has to be a file name but is a folder", path)
    if not os.path.exists(folder):
        raise FileNotFoundError(errno.ENOENT, f"no such folder for `{option}` (create it first)", folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"not a folder, so `{option}` cannot be written inside it", folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"cannot write `{option}` here: {e.strerror or e}", folder) from None


def write_output(path: str, write) -> None:
    """Run ``write()`` (an atomic write of ``path``: all or nothing); an OSError without a file
    name (a full disk) gets ``path``, so its line says which file failed."""
    try:
        write()
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """Stats on stdout; exit status 2 with one ``error:`` line for bad options, a folder that is
    not a dataset, or an output that cannot be written (checked before the masks are read)."""
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
    except (ValueError, OSError) as e:
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

"""``python -m pccfast.merge DIR... [--out DIR]``: one dataset from what sharded runs wrote.

Job arrays run ``python -m pccfast.generate ... --shard I/N`` (SLURM, Kubernetes, plain
``for``) into one shared directory, or each into its own. Every shard writes its samples'
files, its manifest ``manifests/shard-I-of-N.jsonl`` and the list of ids it was given,
``manifests/shard-I-of-N.plan``. This command rebuilds ``manifest.jsonl`` and
``ImageSets/Segmentation/train.txt`` from them (in place for one directory; several
directories are linked or copied into ``--out``) and reports the gaps: ids a shard was given
but did not finish, shards that never started, manifest records whose files are gone. Gaps
are printed one per line on stdout (``missing <id> shard I/N``) and make the exit status 1
(as does a merge that finds no finished sample at all);
re-running the unfinished shards with the same command fills them (they resume), after which
the merge is run again.

WebDataset outputs (``generate --format webdataset --shard I/N``, tars
``shards/train-shard-I-of-N-NNNNNN.tar``) merge the same way: ``manifest.jsonl`` and the shard
index ``shards.json`` are rebuilt (tars are linked into ``--out``, or copied without the samples
the merge dropped); a record whose tar lacks its sample is ``incomplete``.

Nothing is written before every check has passed: a folder that is not a dataset, an
``--out`` that is a file or one of several inputs, inputs with other label sets or other run
settings (``run.json``), and ids that have different records in two inputs (timings aside)
are refused with one ``error:`` line and exit status 2, as is any I/O error.
``--on-conflict keep-first`` keeps the first input's record and files of such ids instead.
"""
from __future__ import annotations

import argparse
import sys

from pccfast.cli.common import fail, one_line_errors, report_error
from pccfast.data.merge import ON_CONFLICT, MergeReport, merge_datasets

__all__ = ["gap_lines", "main"]


def gap_lines(report: MergeReport) -> list[str]:
    """One line per gap: ``missing-shard I/N``, ``missing <id> shard I/N``, ``incomplete <id>``."""
    lines = [f"missing-shard {s} (no plan file: the job never started)" for s in report.missing_shards]
    for shard, ids in sorted(report.missing_by_shard.items(), key=lambda kv: tuple(map(int, kv[0].split("/")))):
        lines += [f"missing {i} shard {shard}" for i in ids]
    planned_missing = set(report.missing)
    what = "its image or mask" if report.layout == "voc" else "its sample in the tar it names"
    lines += [f"incomplete {i} (manifest record without {what})" for i in report.incomplete if i not in planned_missing]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.merge",
        description="Merge the output of sharded 'python -m pccfast.generate --shard I/N' runs: rebuild "
        "manifest.jsonl and ImageSets/Segmentation/train.txt (webdataset outputs: manifest.jsonl and the shard "
        "index shards.json) and report gaps (exit status 1 if any, one line per missing id or shard on stdout).",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="dataset directories the shards wrote into (one shared "
                   "directory is merged in place)")
    p.add_argument("--out", default=None, help="merged dataset directory; needed for several DIRs (files are "
                   "hard-linked where possible, else copied)")
    p.add_argument("--on-conflict", choices=ON_CONFLICT, default="fail",
                   help="an id with different records in two inputs: 'fail' (default, nothing is written) or "
                   "'keep-first' (the first DIR's record and files are kept, the others dropped with a warning)")
    p.add_argument("--quiet", action="store_true", help="print only the gaps, no summary")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        report = merge_datasets(args.dirs, args.out, on_conflict=args.on_conflict)
    except (ValueError, OSError) as exc:
        fail(exc)
    target = args.out or args.dirs[0]
    if report.dropped:
        n = sum(len(v) for v in report.dropped.values())
        ids = sorted(report.dropped)
        print(f"warning: {len(ids)} ids had different records in several inputs ({', '.join(ids[:5])}"
              f"{', ...' if len(ids) > 5 else ''}): kept the first input's, dropped {n} records", file=sys.stderr)
    gaps = gap_lines(report)
    for line in gaps:
        print(line)
    if not args.quiet:
        files = "train.txt" if report.layout == "voc" else "shards.json"
        print(f"{len(report.ids)} samples -> {target} ({files}, manifest.jsonl); "
              f"{f'{len(gaps)} gaps' if gaps else 'no gaps'}", file=sys.stderr)
    if not report.ids and not gaps:
        return report_error(f"no finished samples (no manifest records) in {', '.join(args.dirs)}", 1)
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())

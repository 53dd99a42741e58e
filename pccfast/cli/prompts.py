"""``python -m pccfast.prompts``: write a prompt bank as JSON Lines, turn captions into prompts,
or check a prompt file."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from pccfast.cli.common import report_error
from pccfast.data.fileio import atomic_write_bytes
from pccfast.data.labelsets import get_label_set
from pccfast.data.prompt_bank import DEFAULT_PER_CLASS, captions_to_prompts, prompt_bank
from pccfast.data.prompts import PromptEntry, read_prompts

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.prompts",
        description="Write a prompt bank as JSON Lines ({\"id\", \"prompt\", \"classes\"} per line, readable by "
        "python -m pccfast.generate --prompts), turn captions into prompts, or check a prompt file.",
    )
    p.add_argument("--label-set", default="voc", metavar="NAME|FILE",
                   help="label set: voc, coco, or a JSON/YAML label-set file; its optional 'synonyms' "
                   "({class: [words]}) extend caption matching (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help=f"prompts anchored on each class (bank; default {DEFAULT_PER_CLASS}); with --from: keep a "
                   "caption only while one of its classes has fewer than N kept captions (default: no cap)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the template and partner choices (bank only; default: %(default)s)")
    p.add_argument("--pair-share", type=float, default=0.4, metavar="P",
                   help="share of each class's prompts that name a second class (bank only; default: %(default)s)")
    p.add_argument("--from", dest="captions", default=None, metavar="CAPTIONS.txt",
                   help="instead of templates, one caption per line: keep captions that name a class (by its "
                   "name or a synonym, e.g. 'couch' -> sofa for VOC) with the classes found")
    p.add_argument("--out", default=None, metavar="FILE", help="output JSON Lines file (default: standard output)")
    p.add_argument("--check", default=None, metavar="FILE",
                   help="only read a prompt file (JSON list, JSON Lines or text) with the label set and print a "
                   "summary, or the first error as FILE:LINE: message")
    return p


def _summary(entries: list[PromptEntry]) -> str:
    counts = Counter(c for e in entries for c in set(e.classes))
    lines = [f"{len(entries)} prompts" + (f", indices {entries[0].index}..{entries[-1].index}" if entries else "")]
    lines += [f"  {c:<16} {n:>7}" for c, n in counts.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        label_set = get_label_set(args.label_set)
        if args.per_class is not None and args.per_class < 0:
            raise ValueError(f"`--per-class` has to be >= 0 but is {args.per_class}")
        if args.check:
            summary = _summary(read_prompts(args.check, label_set))
        elif args.captions:
            with open(args.captions, encoding="utf-8") as f:
                records = captions_to_prompts(f, label_set, per_class=args.per_class)
        else:
            per_class = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
            records = prompt_bank(label_set, per_class, seed=args.seed, pair_share=args.pair_share)
    except (ValueError, OSError) as e:
        return report_error(e)
    if args.check:
        print(summary)
        return 0
    text = "".join(json.dumps({k: r[k] for k in ("id", "prompt", "classes")}, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"{len(records)} prompts -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pccfast.prompts``: write a prompt bank as JSON Lines, turn captions into prompts,
or check a prompt file.

Nothing is ever written or passed empty: ``--per-class 0``, captions of which none names a
class, and a checked file without usable prompts are each one ``error: ...`` line and exit
status 2, with no output file. ``--out`` is checked before any work (a directory, a missing
folder) and a file that cannot be written is an ``error: FILE: cannot be written: reason``
line. ``--check`` prints one ``warning: FILE:LINE: empty prompt, skipped (...)`` line on
stderr per empty prompt and counts them in its summary. A reader that closes standard output
early (``| head -1``) ends the command quietly (exit status 0, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from pccfast.cli.common import one_line_errors, report_error
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
                   "summary (with the number of empty prompts skipped; each one is a 'warning: FILE:LINE: ...' "
                   "line on stderr), or the first error as FILE:LINE: message")
    return p


def _summary(entries: list[PromptEntry], empty: int = 0) -> str:
    counts = Counter(c for e in entries for c in set(e.classes))
    head = f"{len(entries)} prompts" + (f", indices {entries[0].index}..{entries[-1].index}" if entries else "")
    if empty:
        head += f", {empty} empty prompt{'' if empty == 1 else 's'} skipped (listed as warnings)"
    lines = [head] + [f"  {c:<16} {n:>7}" for c, n in counts.most_common()]
    return "\n".join(lines)


def _check_out(path: str) -> None:
    """Refuse an ``--out`` that cannot become a file, before any work is done."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; `--out` has to name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"{path}: its folder {folder} {what} (`--out`)")


def _captions(path: str, label_set, per_class: int | None) -> list[dict]:
    """Prompt records of a captions file; ValueError when none names a class."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = captions_to_prompts(lines, label_set, per_class=per_class)
    if not records:
        n = sum(1 for x in lines if x.strip() and not x.strip().startswith("#"))
        if not n:
            raise ValueError(f"{path}: holds no captions")
        raise ValueError(f"{path}: none of its {n} caption{'' if n == 1 else 's'} names a class of label set "
                         f"{label_set.name!r}; no prompts written")
    return records


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    empty: list[str] = []
    try:
        label_set = get_label_set(args.label_set)
        if args.per_class is not None and args.per_class < 1:
            raise ValueError(f"`--per-class` has to be >= 1 but is {args.per_class}")
        if args.check:
            entries = read_prompts(args.check, label_set, warn=empty.append)
        else:
            if args.out:
                _check_out(args.out)
            if args.captions:
                records = _captions(args.captions, label_set, args.per_class)
            else:
                per_class = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
                records = prompt_bank(label_set, per_class, seed=args.seed, pair_share=args.pair_share)
                if not records:  # per_class >= 1 and a class to anchor on: not reached, but never write nothing
                    raise ValueError(f"the prompt bank of label set {label_set.name!r} is empty; no prompts written")
    except (ValueError, OSError) as e:
        return report_error(e)
    if args.check:
        for line in empty:
            print(f"warning: {line}", file=sys.stderr)
        sys.stdout.write(_summary(entries, len(empty)) + "\n")
        return 0
    text = "".join(json.dumps({k: r[k] for k in ("id", "prompt", "classes")}, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        try:
            atomic_write_bytes(args.out, text.encode("utf-8"))
        except OSError as e:
            return report_error(f"{args.out}: cannot be written: {e.strerror or e}")
        print(f"{len(records)} prompts -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)  # a reader that has gone (| head): one_line_errors
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pccfast.native [NAME...]``: build the C kernels into the kernel cache ahead of a run."""
from __future__ import annotations

import argparse
import sys

from pccfast.backends.native import build_kernels
from pccfast.cli.common import one_line_errors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pccfast.native",
                                description="Build and load pccfast's C kernels (kernels/*.c) into the kernel cache "
                                "and report where each one is. Later processes reuse the cached builds. Environment: "
                                "PCCFAST_KERNEL_CACHE (cache folder), PCCFAST_NATIVE=0 (disable), CC (compiler).")
    p.add_argument("names", nargs="*", metavar="NAME", help="kernels to build (default: all of them)")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """One line per kernel; exit status 1 if one is unavailable (Ctrl-C, a closed stdout, an OSError:
    :func:`~pccfast.cli.common.one_line_errors`)."""
    args = build_parser().parse_args(argv)
    results = build_kernels(args.names)
    for n, path, why in results:
        print(f"{n}: ok ({path})" if why is None else f"{n}: unavailable: {why}")
    return 0 if all(why is None for _, _, why in results) else 1


if __name__ == "__main__":
    sys.exit(main())

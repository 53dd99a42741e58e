"""``python -m pccfast.relabel``: the command lives in :mod:`pccfast.cli.relabel`."""
import sys

from pccfast.cli.relabel import main

if __name__ == "__main__":
    sys.exit(main())

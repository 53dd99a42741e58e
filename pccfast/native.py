"""``python -m pccfast.native``: the command lives in :mod:`pccfast.cli.native`."""
import sys

from pccfast.cli.native import main

if __name__ == "__main__":
    sys.exit(main())

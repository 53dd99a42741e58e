"""``python -m pccfast.generate``: the command lives in :mod:`pccfast.cli.generate`."""
import sys

from pccfast.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

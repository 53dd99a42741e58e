"""``python -m pccfast.train``: the command lives in :mod:`pccfast.cli.train`."""
import sys

from pccfast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

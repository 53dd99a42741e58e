"""``python -m pccfast.evaluate``: the command lives in :mod:`pccfast.cli.evaluate`."""
import sys

from pccfast.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

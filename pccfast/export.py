"""``python -m pccfast.export``: the command lives in :mod:`pccfast.cli.export`."""
import sys

from pccfast.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m pccfast.inspect``: the command lives in :mod:`pccfast.cli.inspect`."""
import sys

from pccfast.cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())

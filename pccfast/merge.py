"""``python -m pccfast.merge``: the command lives in :mod:`pccfast.cli.merge`."""
import sys

from pccfast.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())

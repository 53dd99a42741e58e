"""``python -m pccfast.prompts``: the command lives in :mod:`pccfast.cli.prompts`."""
import sys

from pccfast.cli.prompts import main

if __name__ == "__main__":
    sys.exit(main())

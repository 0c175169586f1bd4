"""``python -m streammerge ...``: the ``streammerge`` command (``streammerge.cli.main``)."""

import sys

from streammerge.cli import main

if __name__ == "__main__":
    sys.exit(main())

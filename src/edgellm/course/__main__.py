"""``python -m edgellm.course ...`` is ``edgellm course ...``."""

import sys

from edgellm.cli import main

raise SystemExit(main(["course", *sys.argv[1:]]))

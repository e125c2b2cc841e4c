"""``python -m mrmeta`` runs the command-line tool."""

import sys

from mrmeta.cli import main

sys.exit(main())

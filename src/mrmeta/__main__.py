"""``python -m mrmeta`` runs the command-line tool."""

from mrmeta.cli import run

run()

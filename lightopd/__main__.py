"""`python -m lightopd` runs the command-line interface."""

from lightopd.cli import main

main()

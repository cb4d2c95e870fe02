"""Verifiable tasks: answer checkers (and, later, the bundled demo task)."""

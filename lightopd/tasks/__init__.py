"""Verifiable tasks: answer checkers (checkers.py), the verifier eval picks by name (verifiers.py),
and the bundled demo task (addition.py) with its shipped teachers."""

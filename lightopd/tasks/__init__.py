"""Verifiable tasks: answer checkers (checkers.py), the verifier eval picks by name (verifiers.py),
a user's checker in a worker process of its own (isolated.py), and the bundled demo task
(addition.py) with its shipped teachers."""

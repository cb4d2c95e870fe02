"""`python -m lightopd` runs the command-line interface."""

from lightopd.cli import main

if __name__ == "__main__":  # a spawned process (vLLM's workers) imports this module again
    main()

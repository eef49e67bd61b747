"""`python -m orchestrator` runs the `mmae` CLI."""

from orchestrator.cli.app import main

if __name__ == "__main__":
    main()

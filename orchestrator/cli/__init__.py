"""The `mmae` command line (laptop side).

Modules here import only the standard library, typer and other `orchestrator.cli` modules at module level, so that
`mmae --help` stays fast; pydantic, yaml, sky, ray, mlflow and torch are imported inside command bodies.
"""

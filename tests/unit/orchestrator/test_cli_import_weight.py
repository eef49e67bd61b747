"""`mmae --help` stays light: no heavy module is imported and it starts in well under 0.3 s (house style 4.4 #22).

Each check runs a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# Top-level packages that must not load for --help: the heavy ones, and those the CLI only needs inside command
# bodies (pydantic, yaml). rich: help is plain text (typer_factory), so Typer never loads it.
BANNED_FOR_HELP = ("torch", "ray", "mlflow", "sky", "timm", "numpy", "pydantic", "yaml", "rich", "s3fs", "fsspec")
# Typer 0.29 itself imports pydantic to coerce parameter values once any subcommand is parsed (the root's --help
# flag, None there, goes through a pydantic TypeAdapter), so below the root only pydantic is allowed in addition.
BANNED_FOR_SUBCOMMAND_HELP = tuple(name for name in BANNED_FOR_HELP if name != "pydantic")
# Resolving a job may load pydantic and yaml, never the training or cloud stacks.
BANNED_FOR_RENDER = ("torch", "ray", "mlflow", "sky", "timm", "numpy", "s3fs", "fsspec")
HELP_BUDGET_S = 0.3

_PROBE = """
import json, sys
from orchestrator.cli.app import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code in (0, None), (argv, exit.code)
print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})), file=sys.stderr)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMAE_DEBUG", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _loaded_after(argvs: list[list[str]]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def _all_command_paths() -> list[list[str]]:
    import typer

    from orchestrator.cli.app import app

    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*path, name])
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_python_m_orchestrator_help_imports_nothing_heavy() -> None:
    # -X importtime lists every module the real entry point imports, one per line on stderr.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "orchestrator", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mmae")
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "typer" in imported  # the probe sees imports at all
    assert imported.isdisjoint(BANNED_FOR_HELP), sorted(imported & set(BANNED_FOR_HELP))


def test_root_help_and_version_import_nothing_heavy() -> None:
    loaded = _loaded_after([["--help"], ["--version"]])
    assert "typer" in loaded
    assert loaded.isdisjoint(BANNED_FOR_HELP), sorted(loaded & set(BANNED_FOR_HELP))


def test_every_command_help_imports_nothing_heavy() -> None:
    loaded = _loaded_after([[*path, "--help"] for path in _all_command_paths()])
    assert "typer" in loaded
    assert loaded.isdisjoint(BANNED_FOR_SUBCOMMAND_HELP), sorted(loaded & set(BANNED_FOR_SUBCOMMAND_HELP))


def test_resolving_a_job_stays_off_the_training_and_cloud_stacks() -> None:
    loaded = _loaded_after([["config", "render", "jobs/pretrain_base.yaml"], ["config", "schema"]])
    assert {"pydantic", "yaml", "multimae_core"} <= loaded
    assert loaded.isdisjoint(BANNED_FOR_RENDER), sorted(loaded & set(BANNED_FOR_RENDER))


def test_help_is_fast() -> None:
    # Best of several runs: the floor is what start-up costs; the rest is other load on a shared machine.
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "orchestrator", "--help"],
            capture_output=True,
            check=True,
            cwd=REPO,
            env=_env(),
            timeout=60,
        )
        timings.append(time.perf_counter() - start)
    assert min(timings) < HELP_BUDGET_S, f"mmae --help took {min(timings):.3f} s at best (budget {HELP_BUDGET_S} s)"

"""infra/: the MLflow server task parses with SkyPilot, the image installs exactly pyproject's pins, the guide is
consistent with the files it names."""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
INFRA = REPO / "infra"
SERVER_TASK = INFRA / "sky" / "mlflow_server.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
GUIDE = INFRA / "README.md"


@pytest.fixture(scope="module")
def server_config() -> dict:
    return yaml.safe_load(SERVER_TASK.read_text())


def test_mlflow_server_task_passes_skypilot_parser(server_config: dict) -> None:
    import sky

    task = sky.Task.from_yaml_config(copy.deepcopy(server_config))
    (res,) = task.resources
    assert res.ports == ["5000"]
    assert task.envs["MLFLOW_PORT"] == "5000"
    # the launch-time secrets resolve the null references into real (redacted) values
    secrets = [(k, f"value-of-{k}") for k in server_config["secrets"]]
    with_values = sky.Task.from_yaml_config(copy.deepcopy(server_config), secrets_overrides=secrets)
    assert sorted(with_values.secrets) == sorted(server_config["secrets"])


def test_mlflow_server_task_has_database_bucket_and_auth(server_config: dict) -> None:
    run = server_config["run"]
    assert "--app-name basic-auth" in run
    assert re.search(r"--backend-store-uri \"\$\{DB\}/mlflow\"", run) and 'DB="postgresql://' in run
    assert '--artifacts-destination "${ARTIFACTS_URI}"' in run
    assert server_config["envs"]["ARTIFACTS_URI"].startswith("s3://")
    assert "--port \"${MLFLOW_PORT}\"" in run and "--host 0.0.0.0" in run
    # credentials are secrets with no value in the file; nothing secret-looking sits in envs
    assert set(server_config["secrets"]) >= {"AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                             "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert all(value is None for value in server_config["secrets"].values())
    assert not [k for k in server_config["envs"] if re.search(r"SECRET|PASSWORD|TOKEN|KEY_ID", k)]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mlflow_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("mlflow=="))
    assert server_config["envs"]["MLFLOW_VERSION"] == mlflow_pin.split("==")[1]


@pytest.mark.parametrize("key", ["setup", "run"])
def test_mlflow_server_scripts_are_valid_bash(server_config: dict, key: str) -> None:
    result = subprocess.run(["bash", "-n"], input=server_config[key], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                logical.append((word.upper(), rest.strip()))
            current = ""
    return logical


def test_dockerfile_installs_the_project_with_pyproject_pins() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    names = [name for name, _ in steps]
    assert names[0] == "FROM"
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD", "ARG", "LABEL", "USER", "EXPOSE"}
    assert set(names) <= known, set(names) - known
    base = steps[0][1]
    version = re.match(r"python:(\d+)\.(\d+)", base)
    assert version, base
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert (int(version[1]), int(version[2])) >= tuple(int(x) for x in re.findall(r"\d+", requires)[:2])
    copies = [args for name, args in steps if name == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert {"multimae_core", "orchestrator"} <= {c.split()[0] for c in copies}
    runs = " ".join(args for name, args in steps if name == "RUN")
    # dependencies come from pyproject itself (so the image cannot drift from the pins), then the project
    assert "tomllib" in runs and "['project']['dependencies']" in runs
    assert "pip install --system --no-deps -e ." in runs
    for tool in ("rsync", "openssh-server", "sudo", "curl"):
        assert tool in runs


def test_guide_names_existing_files_and_real_commands() -> None:
    text = GUIDE.read_text()
    for section in ("Bucket", "Credentials", "Tracking server", "First launch"):
        assert re.search(rf"^## \d+\. {section}", text, re.M), section
    paths = set(re.findall(r"(?:infra|jobs)/[\w./-]+\.(?:yaml|md)|infra/docker/Dockerfile", text))
    assert paths
    for path in paths:
        assert (REPO / path).exists(), path
    commands = set(re.findall(r"^mmae (\w+)", text, re.M)) | set(re.findall(r"`mmae (\w+)", text))
    assert {"launch", "status", "logs", "down"} <= commands
    from orchestrator.cli.app import app

    typers = [app, *(group.typer_instance for group in app.registered_groups)]
    registered = {c.name or c.callback.__name__ for t in typers for c in t.registered_commands}
    assert commands <= registered, commands - registered
    # every secret the server task needs is explained
    server_secrets = yaml.safe_load(SERVER_TASK.read_text())["secrets"]
    for name in server_secrets:
        assert name in text, name

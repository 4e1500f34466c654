"""docker/ for users with Docker: the compose file parses, and everything it names exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from clients.cli import app as cli_app
from tests.conftest import ROOT

DOCKER = ROOT / "docker"


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def pigeon_env_vars() -> set[str]:
    """Every PIGEON_* variable a pigeon command reads."""
    import typer.main

    names: set[str] = set()
    group = typer.main.get_group(cli_app)
    stack = [group]
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        for param in getattr(cmd, "params", []):
            env = getattr(param, "envvar", None)
            names.update([env] if isinstance(env, str) else env or [])
    return names


def test_compose_has_the_services_and_the_one_shot_migration() -> None:
    services = compose()["services"]
    assert {"cassandra", "redis", "minio", "migrate", "pigeon"} <= set(services)
    assert services["migrate"]["command"] == ["pigeon", "db", "migrate"]
    assert services["pigeon"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_build_path_and_copied_path_exists() -> None:
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if not build:
            continue
        context = (DOCKER / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (context / src).exists(), f"{dockerfile}: COPY {src}"


def test_every_variable_is_defined_and_every_pigeon_setting_is_real() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    defined = {ln.split("=", 1)[0] for ln in (DOCKER / ".env").read_text().splitlines() if "=" in ln
               and not ln.startswith("#")}
    for var in re.findall(r"\$\{(\w+)\}", text):
        assert var in defined, f"${{{var}}} is not set in docker/.env"
    known = pigeon_env_vars()
    assert {"PIGEON_STORE", "PIGEON_REDIS", "PIGEON_MEDIA", "PIGEON_HOST"} <= known
    for svc in compose()["services"].values():
        for var in svc.get("environment", {}):
            if var.startswith("PIGEON_"):
                assert var in known, f"{var} is read by no pigeon command"


def test_dockerfile_installs_every_backend_extra() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert ".[cassandra,redis,s3]" in text
    assert Path(ROOT / "pyproject.toml").read_text().count("[project.optional-dependencies]") == 1

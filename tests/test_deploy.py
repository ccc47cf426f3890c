"""docker-compose.yml and the Dockerfile agree with the code they run.

There is no Docker engine here, so the compose file is read as YAML with its ${VAR:-default}
settings resolved to their defaults (what `docker compose up` without a .env uses), and checked
against the real CLI (every service command parses with typer's own parser), the environment
variables the package reads, the storage URLs tuner.store.urls accepts, the bundled study specs, and
the loopback-only rule for published ports. `docker compose config` runs too where the compose
plugin is installed. The compose flow itself (`tuner create`, then `tuner worker` joining by
TUNER_STORAGE) runs for real on PostgreSQL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from test_worker import run_cli, study_yaml, trials

from tuner.cli import app
from tuner.store.urls import store_exists
from tuner.study.spec import load_study_spec

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TUNER_SERVICES = ("dashboard", "create", "worker")  # the services running the project's image
POSTGRES_IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}  # what the postgres image reads
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^{}]*))?\}")


def resolve(value: Any) -> Any:
    """``value`` with every ${NAME:-default} replaced by its default, innermost first (nesting works).

    A ${NAME} without a default fails: `docker compose up` must work with no settings at all."""
    if isinstance(value, dict):
        return {resolve(k): resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    if not isinstance(value, str):
        return value
    while (found := _VAR.search(value)) is not None:
        assert found["default"] is not None, f"${{{found['name']}}} has no default: {value!r}"
        value = value[: found.start()] + found["default"] + value[found.end():]
    assert "$" not in value, f"unresolved interpolation left in {value!r}"
    return value


COMPOSE: dict[str, Any] = resolve(yaml.safe_load(COMPOSE_TEXT))
SERVICES: dict[str, Any] = COMPOSE["services"]


def parse_cli(args: list[str]) -> dict[str, Any]:
    """Parse `tuner ARGS` with the real typer/click command tree; an unknown option raises UsageError."""
    group = typer.main.get_command(app)
    name, *rest = args
    group_ctx = group.make_context("tuner", list(args))
    command = group.get_command(group_ctx, name)
    assert command is not None, f"`tuner {name}` is not a command"
    return command.make_context(name, list(rest), parent=group_ctx).params


def env_vars_read_by_the_package() -> set[str]:
    """Environment variable names the package reads: os.environ[...] / .get(...) and typer envvar=."""
    names: set[str] = set()
    for path in (ROOT / "tuner").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"os\.environ(?:\.get\(|\[)\s*[\"']([A-Z0-9_]+)[\"']", text))
        names |= set(re.findall(r"envvar=[\"']([A-Z0-9_]+)[\"']", text))
    return names


def test_the_services_exist_and_tuner_services_use_the_project_image() -> None:
    assert {"postgres", "dashboard", "create", "worker"} <= set(SERVICES)
    assert SERVICES["postgres"]["image"].startswith("postgres:15")
    for name in TUNER_SERVICES:
        service = SERVICES[name]
        assert service["build"]["context"] == ".", name  # built from this repository's Dockerfile
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert "setup" in SERVICES["create"]["profiles"]  # one-shot: not started by a plain `up`
    assert "replicas" not in SERVICES["worker"].get("deploy", {})  # `--scale worker=N` decides
    assert "container_name" not in SERVICES["worker"]  # a fixed name would make scaling fail


def test_every_service_command_parses_with_the_real_cli() -> None:
    parsed = {name: parse_cli(SERVICES[name]["command"]) for name in TUNER_SERVICES}
    assert parsed["dashboard"]["host"] == "0.0.0.0"  # reachable through the published port...
    assert parsed["worker"]["study"]
    # ...and the bad option is caught, so the check above can fail
    with pytest.raises(Exception, match="No such option"):
        parse_cli(["dashboard", "--bind", "0.0.0.0"])


def test_the_dashboard_is_published_on_loopback_only_and_the_cli_default_stays_loopback() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
    (dashboard_port,) = SERVICES["dashboard"]["ports"]
    container_port = dashboard_port.split(":")[-1]
    assert parse_cli(SERVICES["dashboard"]["command"])["port"] == int(container_port)
    assert parse_cli(["dashboard"])["host"] == "127.0.0.1"  # outside compose the CLI binds loopback


def test_environment_variables_are_ones_the_code_reads() -> None:
    read = env_vars_read_by_the_package()
    assert {"TUNER_STORAGE", "TUNER_ARTIFACTS"} <= read  # the scan itself finds the ones we rely on
    for name in TUNER_SERVICES:
        env = SERVICES[name]["environment"]
        assert set(env) <= read, f"{name} sets {set(env) - read}, which no tuner code reads"
        assert {"TUNER_STORAGE", "TUNER_ARTIFACTS"} <= set(env), name
        mounts = {m.split(":")[1] for m in SERVICES[name]["volumes"]}
        assert env["TUNER_ARTIFACTS"] in mounts, f"{name}: TUNER_ARTIFACTS is not on the shared volume"
    assert set(SERVICES["postgres"]["environment"]) <= POSTGRES_IMAGE_ENV


def test_the_storage_url_reaches_the_postgres_service_in_the_scheme_tuner_accepts() -> None:
    pg = SERVICES["postgres"]
    env = pg["environment"]
    for name in TUNER_SERVICES:
        url_text = SERVICES[name]["environment"]["TUNER_STORAGE"]
        assert store_exists(url_text)  # tuner.store.urls parses it (a TunerError otherwise), connecting nowhere
        url = make_url(url_text)
        assert url.drivername == "postgresql+psycopg"
        assert (url.host, url.port or 5432) == ("postgres", 5432)  # the service name, the container's port
        assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                              env["POSTGRES_DB"])
    check = " ".join(pg["healthcheck"]["test"])
    assert "pg_isready" in check and env["POSTGRES_USER"] in check
    assert any(v.endswith(":/var/lib/postgresql/data") and not v.startswith((".", "/")) for v in pg["volumes"])
    assert "pgdata" in COMPOSE["volumes"]


def test_the_worker_reserves_a_gpu_and_joins_the_study_the_create_service_creates() -> None:
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count", 0) == 1 or device.get("device_ids")
    # the spec `create` reads is in the repository (mounted at /app/studies), and names the worker's study
    spec_path = parse_cli(SERVICES["create"]["command"])["spec_path"]
    assert "./studies:/app/studies:ro" in SERVICES["create"]["volumes"]
    spec = load_study_spec(ROOT / spec_path)
    assert spec.study == parse_cli(SERVICES["worker"]["command"])["study"]


def test_dockerfile_has_a_cuda_switch_and_installs_pinned_torch_before_the_project() -> None:
    makefile_pin = re.search(r"pip install torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.MULTILINE))
    assert args["DEVICE"] == "cpu" and "cuda" in args["CUDA_IMAGE"]
    assert re.search(r"^FROM python:3\.11-slim AS base-cpu$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base-cuda$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^FROM base-\$\{DEVICE\}$", DOCKERFILE, re.MULTILINE)
    assert "https://download.pytorch.org/whl/cpu" in DOCKERFILE
    torch_line = DOCKERFILE.index(f"pip install torch=={makefile_pin.group(1)} --index-url")
    assert torch_line < DOCKERFILE.index("RUN pip install .")
    # compose builds the variant it is told to, the CPU one by default
    assert SERVICES["worker"]["build"]["args"]["DEVICE"] == "cpu"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "storage"} <= set(ignored)


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    proc = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_create_then_worker_is_the_compose_flow_on_postgres(tmp_path: Path, small_npz: Path, pg_url: str) -> None:
    """`create` (the one-shot service) makes the study and trains nothing; a `worker` then joins it by
    name with TUNER_STORAGE alone, as the worker service does. The password never shows."""
    url = pg_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it; tuner must still hide it
    unused = f"sqlite:///{tmp_path}/unused.db"  # the spec's own store, which TUNER_STORAGE overrides
    spec = study_yaml(tmp_path, small_npz, "compose", unused, budget={"trials": 2, "epochs": 2})
    env = {"TUNER_STORAGE": url, "TUNER_ARTIFACTS": str(tmp_path / "art")}
    created = run_cli("create", str(spec), env=env, timeout=120)
    assert created.returncode == 0, created.stderr
    assert "study 'compose' ready in" in created.stdout and "0/2 trials finished" in created.stdout
    assert "s3cret" not in created.stdout + created.stderr and "***" in created.stdout
    assert trials(url, "compose") == []  # created, nothing trained
    assert not (tmp_path / "unused.db").exists()  # TUNER_STORAGE won over the spec's store

    worker = run_cli("worker", "--study", "compose", env=env, timeout=180)
    assert worker.returncode == 0, worker.stderr + worker.stdout
    assert "s3cret" not in worker.stdout + worker.stderr
    assert len([t for t in trials(url, "compose") if t.state == TrialState.COMPLETE]) == 2
    again = run_cli("create", str(spec), env=env, timeout=120)  # idempotent: the study is resumed, not reset
    assert again.returncode == 0 and "2/2 trials finished" in again.stdout

    other = study_yaml(tmp_path, small_npz, "compose", unused, budget={"trials": 3, "epochs": 2})
    refused = run_cli("create", str(other), env=env, timeout=120)
    assert refused.returncode == 2 and "exists" in refused.stderr and "another spec" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "s3cret" not in refused.stderr

"""examples/deploy/ agrees with the code, and what it runs works together.

The Dockerfile, docker-compose.yml and nginx.conf are checked against the settings
reference, the HTTP limits and each other, so a renamed setting or a changed limit breaks
this file. There is no Docker engine here: the last test runs the very commands the
compose file runs (`rfmvp migrate`, the Dockerfile's uvicorn command, `rfmvp worker`) as
local processes against the local PostgreSQL and Redis.

PyYAML is not a dependency, so the compose file is read with line patterns. That is
enough for a file written in the block style, which this one is.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from robotframework_mvp.config import Settings, settings_reference
from robotframework_mvp.http import HttpApi

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "examples" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
NGINX = DEPLOY / "nginx.conf"
SECRETS = DEPLOY / "secrets"
DOC = ROOT / "docs" / "deployment.md"

REQUIRED_SERVICES = {"postgres", "redis", "migrate", "api1", "api2", "worker1", "worker2",
                     "nginx"}
API_SERVICES = ("api1", "api2")
WORKER_SERVICES = ("worker1", "worker2")
APP_SERVICES = ("migrate", *API_SERVICES, *WORKER_SERVICES)
#: read by examples/server.py only, not settings
NON_SETTINGS = {"RFMVP_HOST", "RFMVP_PORT"}


# -- reading the files ------------------------------------------------------------------


def _top_level(text: str) -> dict[str, str]:
    """Top-level key -> the rest of its line and its indented block."""
    blocks: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+):(.*)$", line)
        if match:
            current = match.group(1)
            blocks[current] = match.group(2) + "\n"
        elif current is not None:
            blocks[current] += line + "\n"
    return blocks


def _children(block: str) -> dict[str, str]:
    """Keys indented by two spaces -> their blocks."""
    children: dict[str, str] = {}
    current: str | None = None
    for line in block.splitlines():
        match = re.match(r" {2}([A-Za-z0-9_.-]+):(.*)$", line)
        if match:
            current = match.group(1)
            children[current] = match.group(2) + "\n"
        elif current is not None and (line.startswith("   ") or not line.strip()):
            children[current] += line + "\n"
        else:
            current = None
    return children


def _scalar(text: str) -> str:
    text = re.sub(r"\s+#.*$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


class Compose:
    """The parts of docker-compose.yml these tests look at, merge keys resolved."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.top = _top_level(text)
        self.services = _children(self.top.get("services", ""))
        self.anchors = {m.group(2): m.group(1) for m in
                        re.finditer(r"^([A-Za-z0-9_.-]+): &([A-Za-z0-9_-]+)\s*$", text, re.M)}

    def anchor_block(self, name: str) -> str:
        return self.top[self.anchors[name]]

    def _merged(self, own: str) -> str:
        """``own`` after the blocks it merges with ``<<: *anchor`` (own keys last)."""
        merged = ""
        for name in re.findall(r"^\s*<<: \*([A-Za-z0-9_-]+)", own, re.M):
            merged += self._merged(self.anchor_block(name))
        return merged + own

    def service(self, name: str) -> str:
        """The service's block, with what it merges from anchors before it."""
        return self._merged(self.services[name])

    def value(self, service: str, key: str) -> str | None:
        """The last value given to ``key`` (indent 4 in a service, 2 in an anchor)."""
        found = None
        for match in re.finditer(rf"^ {{2,4}}{re.escape(key)}:(.*)$", self.service(service),
                                 re.M):
            found = match.group(1)
        return None if found is None else _scalar(found)

    def command(self, service: str) -> list[str] | None:
        value = self.value(service, "command")
        return None if value is None else json.loads(value)

    def env(self, service: str) -> dict[str, str]:
        value = self.value(service, "environment")
        assert value is not None, f"{service} has no environment"
        assert value.startswith("*"), f"{service}: environment should be an x-... anchor"
        return self.mapping(value[1:])

    def mapping(self, anchor: str) -> dict[str, str]:
        """An anchor's ``KEY: value`` entries, merged anchors first."""
        result: dict[str, str] = {}
        for line in self.anchor_block(anchor).splitlines():
            merge = re.match(r"\s+<<: \*([A-Za-z0-9_-]+)", line)
            if merge:
                result.update(self.mapping(merge.group(1)))
                continue
            entry = re.match(r"\s+([A-Z][A-Z0-9_]*):(.*)$", line)
            if entry:
                result[entry.group(1)] = _scalar(entry.group(2))
        return result

    def list_value(self, service: str, key: str) -> list[str]:
        """A ``key: [a, b]`` flow list, or a block list under ``key:``."""
        block = self.service(service)
        flow = re.findall(rf"^ {{2,4}}{re.escape(key)}: \[(.*)\]\s*$", block, re.M)
        if flow:
            return [_scalar(item) for item in flow[-1].split(",")]
        match = re.search(rf"^( {{2,4}}){re.escape(key)}:\s*\n((?:\1 +.*\n)+)", block, re.M)
        return [] if match is None else [
            _scalar(item) for item in re.findall(r"^\s+- (.*?)\s*$", match.group(2), re.M)]

    def secrets(self) -> dict[str, str]:
        """Top-level ``secrets:``: name -> file."""
        return {name: _scalar(re.search(r"file:(.*)", block).group(1))  # type: ignore[union-attr]
                for name, block in _children(self.top["secrets"]).items()}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def _dockerfile(instruction: str) -> list[str]:
    return [rest for word, rest in _dockerfile_instructions() if word == instruction]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _dockerfile("ENV"):
        for item in shlex.split(rest):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {rest!r}: use the KEY=value form"
            env[key] = value
    return env


def _api_command() -> list[str]:
    (cmd,) = _dockerfile("CMD")
    return list(json.loads(cmd))


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _seconds(text: str) -> float:
    """A compose duration (``30s``, ``1m30s``) or an nginx time (``75s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text.strip(), f"bad duration {text!r}"
    assert parts, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _nginx() -> str:
    return "\n".join(re.sub(r"#.*$", "", line) for line in
                     NGINX.read_text(encoding="utf-8").splitlines())


def _nginx_block(text: str, header: str) -> str:
    start = text.index(header)
    depth, i = 0, text.index("{", start)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    raise AssertionError(f"unbalanced braces after {header!r}")


def _nginx_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", text)
    assert match, f"bad nginx size {text!r}"
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]


def _settings_for(env: dict[str, str]) -> Settings:
    """What a process with this environment runs with (secret files: the examples)."""
    return Settings.from_env(environ=_with_example_secrets(env), env_file=None)


def _with_example_secrets(env: dict[str, str]) -> dict[str, str]:
    files = {f"/run/secrets/{name}": SECRETS / (Path(path).name + ".example")
             for name, path in COMPOSE_FILE.secrets().items()}
    return {k: str(files.get(v, v)) if k.endswith("_FILE") else v for k, v in env.items()}


COMPOSE_FILE = Compose(COMPOSE.read_text(encoding="utf-8"))


# -- docker-compose.yml -----------------------------------------------------------------


def test_compose_defines_every_required_service() -> None:
    missing = REQUIRED_SERVICES - set(COMPOSE_FILE.services)
    assert not missing, f"docker-compose.yml lacks the services {sorted(missing)}"
    assert COMPOSE_FILE.value("postgres", "image") == "postgres:16"
    assert COMPOSE_FILE.value("redis", "image") == "redis:7"
    assert COMPOSE_FILE.value("nginx", "image") == "nginx:stable"
    assert COMPOSE_FILE.list_value("nginx", "ports") == ["8080:80"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in COMPOSE_FILE.list_value("nginx", "volumes")
    for name in ("postgres", "redis"):
        assert "healthcheck:" in COMPOSE_FILE.service(name), f"{name} has no healthcheck"


def test_every_rfmvp_variable_in_the_deploy_files_is_a_real_setting() -> None:
    settings = {row[0] for row in settings_reference()}
    known = settings | {f"{name}_FILE" for name in settings} | NON_SETTINGS
    sources = [COMPOSE, DOCKERFILE, NGINX, SECRETS / "README.md", DOC]
    used: dict[str, set[str]] = {}
    for path in sources:
        for name in re.findall(r"\bRFMVP_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not unknown, f"not settings (renamed or misspelled?): {unknown}"
    assert len(used) >= 15  # the pattern still finds them


def test_every_app_service_runs_with_a_valid_configuration() -> None:
    for service in APP_SERVICES:
        env = COMPOSE_FILE.env(service)
        settings = _settings_for(env)  # raises ConfigError naming a bad variable
        assert settings.storage.url.startswith("postgresql://"), service
        assert settings.cache.url.startswith("redis://"), service
        assert settings.storage.migrate_on_startup is False, service
        assert settings.security.api_keys, f"{service} has no API keys"
        assert settings.security.secret_key, f"{service} has no secret key"
        assert settings.plugins == ("modules.demo",), service
        for secret in ("RFMVP_STORAGE_URL", "RFMVP_API_KEYS", "RFMVP_SECRET_KEY"):
            assert secret not in env, (
                f"{service}: {secret} comes from a file ({secret}_FILE), never from the "
                "compose file"
            )


def test_secret_files_are_declared_mounted_ignored_and_have_examples() -> None:
    declared = COMPOSE_FILE.secrets()
    ignored = (SECRETS / ".gitignore").read_text(encoding="utf-8").split()
    assert "*.txt" in ignored
    for name, path in declared.items():
        assert re.fullmatch(r"\./secrets/[\w.-]+\.txt", path), (name, path)
        assert (DEPLOY / (path + ".example")).is_file(), f"no example for {path}"
    for service in APP_SERVICES:
        mounted = set(COMPOSE_FILE.list_value(service, "secrets"))
        for variable, value in COMPOSE_FILE.env(service).items():
            if variable.endswith("_FILE"):
                name = value.removeprefix("/run/secrets/")
                assert name in declared, f"{service}: {variable} names no declared secret"
                assert name in mounted, f"{service}: secret {name} is not mounted"
    postgres_env = COMPOSE_FILE.service("postgres")
    assert "POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password" in postgres_env
    assert "postgres_password" in COMPOSE_FILE.list_value("postgres", "secrets")


def test_api_processes_are_api_only_and_workers_run_the_worker() -> None:
    for service in API_SERVICES:
        settings = _settings_for(COMPOSE_FILE.env(service))
        assert settings.worker.enabled is False, f"{service} would also run a worker"
        assert COMPOSE_FILE.command(service) is None, f"{service}: use the image's CMD"
    for service in WORKER_SERVICES:
        assert COMPOSE_FILE.command(service) == ["rfmvp", "worker"]
        # `rfmvp worker` runs with RFMVP_WORKER_ENABLED as it finds it: false would make
        # it a worker that runs nothing.
        assert _settings_for(COMPOSE_FILE.env(service)).worker.enabled is True, service
        assert "disable: true" in COMPOSE_FILE.services[service], (
            f"{service} serves no HTTP: the image's /health check must be disabled"
        )
    assert COMPOSE_FILE.command("migrate") == ["rfmvp", "migrate"]
    assert COMPOSE_FILE.value("migrate", "restart") == "no"
    migrate = COMPOSE_FILE.services["migrate"]
    assert re.search(r"postgres:\s*\n\s+condition: service_healthy", migrate)
    for service in (*API_SERVICES, *WORKER_SERVICES):
        block = COMPOSE_FILE.service(service)
        assert re.search(r"migrate:\s*\n\s+condition: service_completed_successfully", block), (
            f"{service} may start before the migrations ran"
        )


def test_stop_grace_period_outlasts_the_shutdown_grace() -> None:
    default = Settings().worker.shutdown_grace_seconds
    uvicorn_grace = float(_option(_api_command(), "--timeout-graceful-shutdown"))
    for service in (*API_SERVICES, *WORKER_SERVICES):
        period = COMPOSE_FILE.value(service, "stop_grace_period")
        assert period is not None, f"{service} has no stop_grace_period"
        grace = _settings_for(COMPOSE_FILE.env(service)).worker.shutdown_grace_seconds
        assert grace == float(COMPOSE_FILE.env(service).get(
            "RFMVP_SHUTDOWN_GRACE_SECONDS", default))
        needed = grace if service in WORKER_SERVICES else max(grace, uvicorn_grace)
        # Room after the grace period to release robots and close the pools.
        assert _seconds(period) >= needed + 5, (
            f"{service}: stop_grace_period {period} leaves no room after {needed:g} s"
        )


# -- nginx.conf -------------------------------------------------------------------------


def test_nginx_upstream_is_the_api_services_on_the_api_port() -> None:
    upstream = _nginx_block(_nginx(), "upstream rfmvp_api")
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream, re.M)
    assert {host for host, _ in servers} == set(API_SERVICES)
    assert {port for _, port in servers} == {_option(_api_command(), "--port")}
    assert re.search(r"^\s*least_conn;", upstream, re.M)
    assert re.search(r"^\s*keepalive \d+;", upstream, re.M)
    keepalive = re.search(r"^\s*keepalive_timeout (\S+);", upstream, re.M)
    assert keepalive is not None
    # nginx must drop idle upstream connections before uvicorn does.
    assert _seconds(keepalive.group(1)) < float(_option(_api_command(), "--timeout-keep-alive"))
    assert re.search(r"proxy_pass http://rfmvp_api;", _nginx())
    nginx = COMPOSE_FILE.service("nginx")
    for service in API_SERVICES:
        assert re.search(rf"{service}:\s*\n\s+condition: service_healthy", nginx), service


def test_nginx_is_the_only_trusted_forwarder() -> None:
    address = re.search(r"^\s+ipv4_address: (\S+)", COMPOSE_FILE.services["nginx"], re.M)
    subnet = re.search(r"subnet: (\S+)", COMPOSE_FILE.top["networks"])
    assert address is not None
    assert subnet is not None
    nginx_ip = address.group(1)
    assert ipaddress.ip_address(nginx_ip) in ipaddress.ip_network(subnet.group(1))
    for service in API_SERVICES:
        assert COMPOSE_FILE.env(service).get("FORWARDED_ALLOW_IPS") == nginx_ip, service
    for header in ("X-Forwarded-For $proxy_add_x_forwarded_for",
                   "X-Forwarded-Proto $scheme", "X-Request-Id $rfmvp_request_id"):
        assert f"proxy_set_header {header};" in _nginx()


def test_nginx_limits_follow_the_settings() -> None:
    settings = _settings_for(COMPOSE_FILE.env("api1"))
    fake_api = SimpleNamespace(orch=SimpleNamespace(settings=settings))
    body_limit = HttpApi.max_body_bytes.fget(fake_api)  # type: ignore[attr-defined]
    server = _nginx_block(_nginx(), "server {")
    size = re.search(r"^\s*client_max_body_size (\S+);", server, re.M)
    assert size is not None
    assert _nginx_size(size.group(1)) == body_limit
    assert f"limit of {body_limit} bytes" in server
    read_timeout = re.search(r"^\s*proxy_read_timeout (\S+);", server, re.M)
    assert read_timeout is not None
    assert _seconds(read_timeout.group(1)) > settings.security.max_wait_seconds + 5
    metrics = _nginx_block(server, "location = /metrics")
    assert re.search(r"^\s*deny all;", metrics, re.M)
    assert "allow" not in metrics, "/metrics is open to an allow rule: keep it closed here"
    assert re.search(r"error_page 413 @payload_too_large;", server)


# -- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_of_the_project() -> None:
    assert _dockerfile("FROM") == ["python:3.11-slim"]
    (user,) = _dockerfile("USER")
    assert user not in ("root", "0")
    (install,) = [r for r in _dockerfile("RUN") if "pip install" in r]
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', install)
    assert extras is not None
    assert extras.group(1).split(",") == ["postgres", "redis", "examples"]
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(optional)
    for rest in _dockerfile("COPY"):
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: nothing in the repo"


def test_dockerfile_serves_the_app_factory_and_loads_the_demo_modules() -> None:
    command = _api_command()
    assert command[0] == "uvicorn"
    assert "--factory" in command
    assert "fastapi_app:create_app" in command
    env = _dockerfile_env()
    assert env["PYTHONPATH"] == "/app/examples"
    assert env["RFMVP_PLUGINS"] == "modules.demo"
    (healthcheck,) = _dockerfile("HEALTHCHECK")
    check = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert check[0] == "python"
    assert f"127.0.0.1:{_option(command, '--port')}/health'" in check[-1]


# -- end to end, without Docker ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _local(command: list[str]) -> list[str]:
    """An image command as a local one: the same program, run by this interpreter."""
    programs = {"rfmvp": [sys.executable, "-m", "robotframework_mvp.cli"],
                "uvicorn": [sys.executable, "-m", "uvicorn"],
                "python": [sys.executable]}
    return programs[command[0]] + command[1:]


def _wait_for(condition: Callable[[], Any], timeout: float, what: str,
              procs: tuple[subprocess.Popen[bytes], ...] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_the_compose_commands_run_robots_together(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    key = secrets.token_urlsafe(24)
    files = {"rfmvp_storage_url": postgres_url, "rfmvp_api_keys": f"e2e:{key}",
             "rfmvp_secret_key": secrets.token_urlsafe(32)}
    for name, content in files.items():
        (tmp_path / name).write_text(content + "\n", encoding="utf-8")

    def environment(service: str) -> dict[str, str]:
        """The service's compose environment over the Dockerfile's ENV, made local."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RFMVP_")}
        for name, value in {**_dockerfile_env(), **COMPOSE_FILE.env(service)}.items():
            value = value.replace("/app/", f"{ROOT}/").replace("/run/secrets/", f"{tmp_path}/")
            env[name] = value
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(ROOT / "src")])
        env["RFMVP_CACHE_URL"] = redis_url
        env["RFMVP_CACHE_KEY_PREFIX"] = redis_prefix
        # Trust the test client (127.0.0.1) as the compose file trusts nginx.
        env["FORWARDED_ALLOW_IPS"] = "127.0.0.1"
        # Only LISTEN/NOTIFY can wake the worker in time: its poll is longer than the wait.
        env["RFMVP_POLL_INTERVAL"] = "120"
        return env

    migrate = subprocess.run(_local(COMPOSE_FILE.command("migrate") or []),
                             env=environment("migrate"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, check=False)
    assert migrate.returncode == 0, migrate.stderr
    assert "applied migrations: 1" in migrate.stdout

    worker_log = tmp_path / "worker1.log"
    worker = spawn("worker1", _local(COMPOSE_FILE.command("worker1") or []),
                   environment("worker1"))
    port = _free_port()
    api_command = _api_command()
    api_command[api_command.index("--host") + 1] = "127.0.0.1"
    api_command[api_command.index("--port") + 1] = str(port)
    api = spawn("api1", _local(api_command), environment("api1"))
    procs = (worker, api)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(healthy, 30, "the API's /health", procs)
    _wait_for(lambda: "running modules: echo, sleep" in worker_log.read_text(), 30,
              "the worker to start with the demo modules", procs)

    # The Dockerfile's HEALTHCHECK, as Docker would run it.
    (healthcheck,) = _dockerfile("HEALTHCHECK")
    check = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    check[-1] = check[-1].replace(":8000/", f":{port}/")
    assert subprocess.run(_local(check), timeout=15, check=False).returncode == 0

    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
        health = client.get("/health").json()
        assert health["components"]["worker"]["enabled"] is False
        assert health["components"]["cache"]["backend"] == "redis"
        assert health["components"]["cache"]["status"] == "ok"

        resp = client.post("/api/v1/robots",
                           json={"kind": "echo", "payload": {"hello": "deploy"}, "wait": 20})
        assert resp.status_code == 200, resp.text
        robot = resp.json()
        assert robot["status"] == "succeeded"
        assert robot["result"] == {"echo": {"hello": "deploy"}}
        (execution,) = client.get(f"/api/v1/robots/{robot['id']}/executions").json()["items"]
        assert f":{worker.pid}:" in execution["worker"]  # run by the worker process

        refused = client.get("/api/v1/robots", headers={"X-API-Key": "not-the-key",
                                                         "X-Forwarded-For": "203.0.113.7"})
        assert refused.status_code == 401

    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker_log.read_text()
    api_rc = api.wait(timeout=30)
    api_log = (tmp_path / "api1.log").read_text()
    # uvicorn stops gracefully, then raises the SIGTERM again (its documented way of
    # exiting "as if" killed by the signal); as PID 1 in a container that raise is ignored
    # and it exits 0.
    assert api_rc in (0, -signal.SIGTERM), api_log
    assert "Application shutdown complete" in api_log
    assert "Traceback" not in api_log + worker_log.read_text()

    import psycopg
    import redis

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        clients = {row[0] for row in conn.execute(
            "SELECT client FROM audit_log WHERE outcome LIKE 'refused:%'")}
    # uvicorn's proxy headers reached the per-address accounting.
    assert clients == {"203.0.113.7"}
    cache = redis.Redis.from_url(redis_url)
    try:
        assert any(cache.scan_iter(match=f"{redis_prefix}*", count=1000))
    finally:
        cache.close()

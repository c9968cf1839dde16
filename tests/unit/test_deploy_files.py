"""The deployment files, checked statically (no Docker engine runs the tests): docker-compose.yml,
the Dockerfile, .dockerignore, deploy/nginx.conf against the gateway's own limits, and .gitignore.
When the `docker compose` plugin is installed, it validates the compose file too."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tollway.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PROD = {"db", "gateway", "proxy"}
DEV = {"anvil", "mock", "gateway-dev"}
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|DATABASE_URL|RPC_URL", re.IGNORECASE)
GATEWAY_SECRETS = {  # the settings that must come from files, and the secrets naming them
    "TOLLWAY_CHAIN__SETTLER_KEY_FILE": "settler_key",
    "TOLLWAY_QUOTE_SECRET_FILE": "quote_secret",
    "TOLLWAY_UPSTREAM__API_KEY_FILE": "upstream_api_key",
    "TOLLWAY_ADMIN_TOKEN_FILE": "admin_token",
    "TOLLWAY_DATABASE_URL_FILE": "database_url",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def words(command: Any) -> list[str]:
    return command.split() if isinstance(command, str) else list(command or [])


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published(service: dict[str, Any]) -> set[int]:
    """Container ports a service publishes on the host."""
    ports = set()
    for p in service.get("ports") or []:
        ports.add(int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths a service mounts (named volumes excluded)."""
    found = []
    for v in service.get("volumes") or []:
        source = v.get("source", "") if isinstance(v, dict) else str(v).split(":", 1)[0]
        if source.startswith((".", "/", "~")):
            found.append(source)
    return found


# -- docker-compose.yml --------------------------------------------------------------------------


def test_every_service_has_a_healthcheck_and_restarts(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert words(check["test"])[0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"
        assert "curl" not in words(check["test"]), f"{name}: slim images have no curl"
        assert service.get("restart") == "unless-stopped", f"{name}: restart is {service.get('restart')}"


def test_production_and_dev_services_never_start_together(compose):
    profiles = {name: set(s.get("profiles") or []) for name, s in compose["services"].items()}
    assert all(len(p) == 1 for p in profiles.values()), f"each service belongs to one profile: {profiles}"
    assert {n for n, p in profiles.items() if p == {"prod"}} == PROD
    assert {n for n, p in profiles.items() if p == {"dev"}} == DEV


def test_production_is_two_replicas_behind_nginx_on_postgres(compose):
    s = compose["services"]
    assert s["gateway"]["deploy"]["replicas"] == 2
    assert s["gateway"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert s["db"]["image"].startswith("postgres:")
    proxy = s["proxy"]
    assert published(proxy) == {8402} and not published(s["gateway"])
    assert proxy["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"^\s*server gateway:8402 resolve;", nginx, re.M), "nginx must name the gateway service"
    major, minor = (int(x) for x in re.search(r"nginx:(\d+)\.(\d+)", proxy["image"]).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (1, 28), "`server ... resolve` in an upstream needs nginx >= 1.27.3"
    assert "configs" not in compose or set(compose["configs"]) == {"tollway_toml"}  # nginx's is a file now
    # The replicas believe nginx's X-Forwarded-For (the free tier counts each client apart), from
    # the compose network's private addresses only.
    assert "X-Forwarded-For $remote_addr" in nginx
    trusted = json.loads(s["gateway"]["environment"]["TOLLWAY_TRUSTED_PROXIES"])
    assert any(ipaddress.ip_address("172.18.0.5") in ipaddress.ip_network(n) for n in trusted)
    assert all(ipaddress.ip_network(n).is_private for n in trusted)


def test_the_dev_profile_runs_anvil_the_mock_and_a_devnet_gateway(compose):
    s = compose["services"]
    anvil = s["anvil"]
    assert anvil["image"].startswith("ghcr.io/foundry-rs/foundry:")
    setup = (ROOT / "scripts" / "setup").read_text()
    anvil_version = re.search(r"^ANVIL_VERSION=(\S+)", setup, re.M).group(1)  # type: ignore[union-attr]
    assert anvil["image"].endswith(f":v{anvil_version}"), "the dev anvil should be the one the tests run"
    assert " ".join(words(anvil.get("entrypoint")) + words(anvil.get("command"))) == "anvil --host 0.0.0.0"
    assert " ".join(words(s["mock"]["command"])) == "tollway mock-upstream --host 0.0.0.0 --port 8403"
    gateway = s["gateway-dev"]
    assert " ".join(words(gateway["command"])) == (
        "tollway serve --devnet --devnet-url http://anvil:8545 --host 0.0.0.0"
    )
    assert env_of(gateway)["TOLLWAY_UPSTREAM__URL"] == "http://mock:8403/v1"
    assert {k: v["condition"] for k, v in gateway["depends_on"].items()} == {
        "anvil": "service_healthy",
        "mock": "service_healthy",
    }
    assert published(gateway) == {8402} and published(anvil) == {8545}
    assert all(str(p).startswith("127.0.0.1:") for p in gateway["ports"] + anvil["ports"]), "dev keys are public"
    for name in ("mock", "gateway-dev"):
        assert s[name]["build"] == "." and s[name]["image"] == s["gateway"]["image"]


def test_secrets_come_from_files(compose):
    declared = compose["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"} and secret["file"] == f"./secrets/{name}", f"secret {name}: {secret}"
    for name, service in compose["services"].items():
        mine = set(service.get("secrets") or [])
        assert mine <= set(declared), f"{name} uses undeclared secrets"
        for var, value in env_of(service).items():
            if var.endswith("_FILE"):
                assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in mine, (
                    f"{name}: {var}={value} is not one of its secrets"
                )
            else:
                assert not SECRETISH.search(var), f"{name}: {var} must come from a file ({var}_FILE)"
                assert not re.search(r"0x[0-9a-fA-F]{64}|sk-[A-Za-z0-9]", value), f"{name}: {var} holds a key"
    env = env_of(compose["services"]["gateway"])
    for var, secret in GATEWAY_SECRETS.items():
        assert env.get(var) == f"/run/secrets/{secret}", f"gateway: {var}"
    assert env_of(compose["services"]["db"])["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"


def test_nothing_mounts_the_venv_the_ledgers_or_the_repository(compose):
    for name, service in compose["services"].items():
        for source in bind_sources(service):
            path = source.removeprefix("./").rstrip("/")
            assert path.startswith("deploy/"), f"{name} mounts {source}: only deploy/ files are mounted"
            assert not re.match(r"(\.venv|\.tools|var|secrets|\.git)(/|$)", path)
    assert {c["file"] for c in (compose.get("configs") or {}).values()} <= {"./tollway.toml"}


def test_keys_and_a_users_configuration_are_never_committed(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # .gitignore alone, whatever the checkout
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    paths = ["tollway.toml", "secrets/settler_key", ".env", "var/tollway.sqlite3", ".venv/bin/python"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=tmp_path, capture_output=True, text=True
    ).stdout.split()
    assert ignored == paths
    example = subprocess.run(["git", "check-ignore", "-q", "--no-index", "tollway.example.toml"], cwd=tmp_path)
    assert example.returncode == 1, "tollway.example.toml must stay in the repository"


# -- Dockerfile and .dockerignore ----------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def test_the_image_runs_as_an_unprivileged_user():
    users = [args.split(":")[0] for k, args in final_stage() if k == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1] not in ("root", "0")


def test_the_image_installs_the_lock_with_hashes_then_the_project_alone():
    runs = [args for k, args in dockerfile() if k == "RUN" and "pip install" in args]
    assert any("--require-hashes" in r and "-r /tmp/requirements.lock" in r for r in runs), runs
    project = [r for r in runs if "requirements.lock" not in r]
    assert project and all("--no-deps" in r for r in project), project


def test_the_image_checks_its_health_with_python():
    checks = [args for k, args in final_stage() if k == "HEALTHCHECK"]
    assert len(checks) == 1 and "python" in checks[0] and "/healthz" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_the_image_bakes_in_no_secret_and_no_configuration():
    for keyword, args in dockerfile():
        if keyword in ("ENV", "ARG"):
            assert not SECRETISH.search(args), f"{keyword} {args}"
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            for source in args.split()[:-1]:
                assert not re.match(r"(\./)?(tollway\.toml|var|secrets|\.env|\.venv)\b", source), source


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (moby's patternmatcher: the last
    pattern matching the path or one of its parent directories decides)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*|\*|\?)", pattern.strip("/")):
            out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parents = [path.split("/")[: i + 1] for i in range(path.count("/") + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = regex(line.removeprefix("!"))
        if any(pattern.match("/".join(p)) for p in parents):
            excluded = not negated
    return excluded


def test_the_build_context_carries_no_keys_ledgers_venv_or_history():
    for path in [
        ".venv/bin/python",
        ".tools/node_modules/solc/index.js",
        "var/tollway.sqlite3",
        "var/devnet.json",
        "tollway.toml",
        "secrets/settler_key",
        ".env",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "src/tollway/__pycache__/app.cpython-311.pyc",
        "src/tollway.egg-info/PKG-INFO",
        "tests/conftest.py",
    ]:
        assert dockerignored(path), f"{path} would be sent to the Docker build"


def test_the_build_context_carries_what_the_dockerfile_copies():
    sources = []
    for keyword, args in dockerfile():
        if keyword == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert "requirements.lock" in sources and "src" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is copied but .dockerignore leaves it out"
    for path in ["src/tollway/app.py", "src/tollway/ledger/migrations/versions/0001_baseline.py"]:
        assert not dockerignored(path), path


# -- deploy/nginx.conf against the gateway's own limits -------------------------------------------


def nginx_directive(name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", (ROOT / "deploy" / "nginx.conf").read_text(), re.M)
    assert len(values) == 1, f"{name}: {values}"
    return values[0].strip()


def size(value: str) -> int:
    return int(value[:-1]) * {"k": 1024, "m": 1024**2}[value[-1].lower()] if value[-1].isalpha() else int(value)


def test_nginx_lets_the_gateway_enforce_its_own_limits():
    defaults = Settings.model_fields
    assert size(nginx_directive("client_max_body_size")) > defaults["max_body_bytes"].default
    assert int(nginx_directive("proxy_read_timeout").removesuffix("s")) > defaults["max_call_seconds"].default
    assert nginx_directive("proxy_buffering") == "off"  # streams pass chunk by chunk
    assert size(nginx_directive("proxy_buffer_size")) >= 8 * 1024  # a 402's headers
    count, each = nginx_directive("proxy_buffers").split()
    assert int(count) * size(each) >= 64 * 1024
    # nginx must drop an idle upstream connection before uvicorn does (its keep-alive: 5 s)
    assert int(nginx_directive("keepalive_timeout").removesuffix("s")) < 5

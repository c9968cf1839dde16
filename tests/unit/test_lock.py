"""requirements.lock (what the Docker image installs, with hashes) pins every runtime dependency of
pyproject.toml, at a version pyproject allows: change a dependency, then run ./scripts/lock."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RELOCK = "pyproject.toml and requirements.lock disagree: run ./scripts/lock (and commit requirements.lock)"


def runtime_requirements() -> list[Requirement]:
    """pyproject's dependencies and its `postgres` extra (what the image runs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["postgres"]]


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """Each locked package: its pinned version and its hashes."""
    text = (ROOT / "requirements.lock").read_text()
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        line = block.replace("\\\n", " ")
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            entries[canonicalize_name(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return entries


def test_every_runtime_dependency_is_pinned_at_an_allowed_version():
    locked = lock_entries()
    problems = []
    for req in runtime_requirements():
        names = [req.name] + [f"{req.name}-{extra}" for extra in req.extras]  # psycopg[binary]: psycopg-binary
        for name in names:
            pin = locked.get(canonicalize_name(name))
            if pin is None:
                problems.append(f"{name} is not in requirements.lock")
            elif name == req.name and not req.specifier.contains(pin[0], prereleases=True):
                problems.append(f"{name}=={pin[0]} does not satisfy pyproject's {req}")
    assert not problems, f"{RELOCK}:\n" + "\n".join(problems)


def test_every_pin_carries_its_hashes():
    locked = lock_entries()
    assert len(locked) > 20
    unhashed = [name for name, (_, hashes) in locked.items() if not hashes]
    assert not unhashed, f"pinned without a hash (pip --require-hashes refuses them): {unhashed}; {RELOCK}"

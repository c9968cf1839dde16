"""The Dockerfile's install, in a fresh venv: the locked dependencies with --require-hashes, then the
project with --no-deps (from the files the image copies); the app imports and the packaged
migrations build a ledger. Reuses pip's cache; needs PyPI (or a cache that holds every pin)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE_FILES = ["pyproject.toml", "README.md", "LICENSE", "src"]  # what the Dockerfile copies


def test_the_lock_installs_with_hashes_and_the_project_on_top(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip configuration is not the image's
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if "PIP_CERT" in os.environ:
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    if "PIP_CACHE_DIR" in os.environ:
        env["PIP_CACHE_DIR"] = os.environ["PIP_CACHE_DIR"]
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = str(target / "bin" / "python")

    def pip(*args: str) -> None:  # this pip, installing into the new venv (no pip of its own to bootstrap)
        command = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile", *args]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    pip("--require-hashes", "--only-binary", ":all:", "-r", str(ROOT / "requirements.lock"))

    project = tmp_path / "project"
    project.mkdir()
    for name in IMAGE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, project / name)
    pip("--no-deps", str(project))

    check = (
        "import sys, tollway.app\n"
        "from sqlalchemy import create_engine\n"
        "from tollway.ledger import migrate\n"
        "assert 'site-packages' in str(migrate.MIGRATIONS), migrate.MIGRATIONS\n"
        f"engine = create_engine('sqlite:///{tmp_path / 'ledger.sqlite3'}')\n"
        "assert migrate.migrate(engine)\n"
        "with engine.connect() as conn: assert migrate.schema_diff(conn) == []\n"
        "print(migrate.head())\n"
    )
    run = subprocess.run([python, "-c", check], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        run.stdout.strip()
        == subprocess.check_output(
            [sys.executable, "-c", "from tollway.ledger import migrate; print(migrate.head())"], text=True
        ).strip()
    )

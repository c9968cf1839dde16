"""A real llama.cpp `llama-server` for tests: its binary (built once by scripts/build-llama-server), a
tiny random-weight GGUF model (made once by scripts/make-tiny-gguf.py) and the command line to serve it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server"
MODEL_SCRIPT = ROOT / "scripts" / "make-tiny-gguf.py"


def llama_server_binary() -> str:
    """Path of the llama-server binary; builds it the first time (~4 min on 2 cores), instant afterwards."""
    proc = subprocess.run([str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise RuntimeError(
            f"scripts/build-llama-server failed (exit {proc.returncode}); it needs cmake, a C++ compiler and "
            f"PyPI access for the llama-cpp-python sdist. Last output:\n{tail}"
        )
    return lines[-1]


def tiny_model(path: str | Path) -> Path:
    """The tiny test model, generated once into the directory above `path` (the binary's cache dir when
    given the binary). The file name carries a hash of the generator, so editing it makes a new model."""
    base = Path(path)
    cache = base.parent.parent if base.is_file() else base
    digest = hashlib.sha256(MODEL_SCRIPT.read_bytes()).hexdigest()[:12]
    model = cache / f"tiny-llama-{digest}.gguf"
    if not model.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = model.with_suffix(f".tmp{os.getpid()}")
        proc = subprocess.run([sys.executable, str(MODEL_SCRIPT), str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"scripts/make-tiny-gguf.py failed (is `gguf` installed?):\n{proc.stderr}")
        tmp.replace(model)  # atomic: concurrent test runs never see a half-written file
    return model


MODEL_ALIAS = "tiny-llama"


def llama_server_command(binary: str | Path, model: str | Path, port: int) -> list[str]:
    """Arguments for a small, fast and deterministic llama-server on 127.0.0.1:`port`."""
    return [
        str(binary),
        "--model",
        str(model),
        "--alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        "2048",
        "--parallel",
        "1",
        "--threads",
        "2",
        "--threads-batch",
        "2",
        "--seed",
        "42",
        "--temp",
        "0",
        "--no-webui",
        "--no-warmup",
        "--jinja",
        "--metrics",
        "--offline",
    ]

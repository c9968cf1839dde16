"""The committed contracts/build/TestUSDC.json must be exactly what solc-js produces."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "contracts" / "TestUSDC.sol"
BUILD = ROOT / "contracts" / "build" / "TestUSDC.json"


def test_source_hash_matches_committed_build() -> None:
    artifact = json.loads(BUILD.read_text())
    assert artifact["contractName"] == "TestUSDC"
    assert artifact["sourceSha256"] == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 2
    names = {e.get("name") for e in artifact["abi"]}
    for fn in (
        "transferWithAuthorization",
        "receiveWithAuthorization",
        "cancelAuthorization",
        "authorizationState",
        "permit",
        "nonces",
        "DOMAIN_SEPARATOR",
        "mint",
        "AuthorizationUsed",
        "AuthorizationCanceled",
    ):
        assert fn in names


def test_build_file_is_canonical_json() -> None:
    text = BUILD.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_committed_build_matches_fresh_compile() -> None:
    # node and solc-js are installed by scripts/setup; without them this must fail, not skip.
    assert shutil.which("node"), "node is not installed"
    assert (ROOT / ".tools" / "node_modules" / "solc").is_dir(), "solc-js is not installed (run scripts/setup)"
    proc = subprocess.run(
        ["node", "scripts/compile-contracts.mjs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stale contracts/build (run scripts/compile-contracts):\n{proc.stderr}"


def test_packaged_artifact_is_the_build() -> None:
    from tollway.devnet.deploy import load_artifact

    packaged = ROOT / "src" / "tollway" / "devnet" / "artifacts" / "TestUSDC.json"
    assert packaged.read_bytes() == BUILD.read_bytes()
    assert load_artifact() == json.loads(BUILD.read_text())

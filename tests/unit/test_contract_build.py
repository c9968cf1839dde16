"""Every committed contracts/build/<Name>.json must be exactly what solc-js produces from contracts/<Name>.sol."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "contracts").glob("*.sol"))
NAMES = [s.stem for s in SOURCES]

# Public entry points each build must expose.
EXPECTED_ABI = {
    "TestUSDC": {
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
    },
    "Permit2": {
        "permitTransferFrom",
        "permitWitnessTransferFrom",
        "nonceBitmap",
        "invalidateUnorderedNonces",
        "DOMAIN_SEPARATOR",
        "UnorderedNonceInvalidation",
        "InvalidNonce",
        "SignatureExpired",
    },
    "X402UptoPermit2Proxy": {
        "settle",
        "settleWithPermit",
        "PERMIT2",
        "WITNESS_TYPE_STRING",
        "UnauthorizedFacilitator",
        "AmountExceedsPermitted",
        "Permit2612AmountMismatch",
    },
    # Every function and event of the x402 SDK's BATCH_SETTLEMENT_ABI, and the timed withdrawal's.
    "X402BatchSettlement": {
        "multicall",
        "deposit",
        "claim",
        "claimWithSignature",
        "settle",
        "initiateWithdraw",
        "finalizeWithdraw",
        "refund",
        "refundWithSignature",
        "getChannelId",
        "channels",
        "pendingWithdrawals",
        "receivers",
        "refundNonce",
        "getVoucherDigest",
        "getRefundDigest",
        "getClaimBatchDigest",
        "DOMAIN_SEPARATOR",
        "Settled",
        "Claimed",
        "Refunded",
        "Deposited",
        "ChannelCreated",
        "ChannelClosed",
        "WithdrawInitiated",
        "WithdrawFinalized",
    },
    "ERC3009DepositCollector": {"collect", "BATCH_SETTLEMENT", "OnlyBatchSettlement"},
    "Permit2DepositCollector": {"collect", "BATCH_SETTLEMENT", "PERMIT2", "WITNESS_TYPE_STRING", "OnlyBatchSettlement"},
    "Multicall3": {"aggregate", "tryAggregate", "tryBlockAndAggregate", "blockAndAggregate", "aggregate3"},
}
# Contracts placed with anvil_setCode (tollway.devnet.canonical) carry their runtime code too.
PLACED = {
    "Permit2",
    "X402UptoPermit2Proxy",
    "X402BatchSettlement",
    "ERC3009DepositCollector",
    "Permit2DepositCollector",
    "Multicall3",
}


def test_every_contract_is_known() -> None:
    assert set(NAMES) == set(EXPECTED_ABI)


@pytest.mark.parametrize("name", NAMES)
def test_source_hash_matches_committed_build(name: str) -> None:
    artifact = json.loads((ROOT / "contracts" / "build" / f"{name}.json").read_text())
    assert artifact["contractName"] == name
    assert artifact["sourceSha256"] == hashlib.sha256((ROOT / "contracts" / f"{name}.sol").read_bytes()).hexdigest()
    assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 2
    assert ("deployedBytecode" in artifact) == (name in PLACED)
    if name in PLACED:
        assert artifact["deployedBytecode"].startswith("0x") and len(artifact["deployedBytecode"]) > 2
    names = {e.get("name") for e in artifact["abi"]}
    assert EXPECTED_ABI[name] <= names


@pytest.mark.parametrize("name", NAMES)
def test_build_file_is_canonical_json(name: str) -> None:
    text = (ROOT / "contracts" / "build" / f"{name}.json").read_text()
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
    # The check covers every contract under contracts/.
    assert sorted(line.split()[0] for line in proc.stdout.splitlines()) == [f"contracts/build/{n}.json" for n in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_packaged_artifact_is_the_build(name: str) -> None:
    from tollway.devnet.deploy import load_artifact

    build = ROOT / "contracts" / "build" / f"{name}.json"
    packaged = ROOT / "src" / "tollway" / "devnet" / "artifacts" / f"{name}.json"
    assert packaged.is_symlink() and packaged.resolve() == build.resolve()
    assert packaged.read_bytes() == build.read_bytes()
    assert load_artifact(name) == json.loads(build.read_text())

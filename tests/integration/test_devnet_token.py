"""TestUSDC on a real anvil: EIP-3009 / EIP-2612 behaviour and the devnet deploy helper."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from support import AUTHORIZATION_FIELDS, SECP256K1_N, free_port
from tollway.devnet.anvil import DEFAULT_MNEMONIC, DEV_KEYS, find_anvil, start_anvil
from tollway.devnet.deploy import MINT_PER_ACCOUNT, Devnet, deploy_devnet, token_contract

FAR_FUTURE = 2**48


@pytest.fixture(scope="module")
def _token_anvil() -> Iterator[str]:
    """A private anvil for this module; yields its RPC URL (fails if anvil is missing: scripts/setup
    installs it)."""
    find_anvil()
    port = free_port()
    proc = start_anvil(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def devnet(_token_anvil: str) -> Devnet:
    return deploy_devnet(_token_anvil)


@pytest.fixture(scope="module")
def w3(_token_anvil: str) -> Web3:
    return Web3(Web3.HTTPProvider(_token_anvil))


@pytest.fixture(scope="module")
def usdc(w3: Web3, devnet: Devnet) -> Contract:
    return token_contract(w3, devnet.token)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _domain(devnet: Devnet) -> dict[str, Any]:
    return {
        "name": devnet.token_name,
        "version": devnet.token_version,
        "chainId": devnet.chain_id,
        "verifyingContract": devnet.token,
    }


def _sign(devnet: Devnet, key: str, primary: str, fields: list[dict], message: dict) -> tuple:
    signed = Account.sign_typed_data(key, _domain(devnet), {primary: fields}, message)
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


def _authorization(
    devnet: Devnet,
    key: str,
    to: str,
    value: int,
    *,
    valid_after: int = 0,
    valid_before: int = FAR_FUTURE,
    primary: str = "TransferWithAuthorization",
    signer_key: str | None = None,
) -> tuple:
    """Args tuple (from, to, value, validAfter, validBefore, nonce, v, r, s) for *WithAuthorization."""
    frm = Account.from_key(key).address
    nonce = os.urandom(32)
    message = {
        "from": frm,
        "to": to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": nonce,
    }
    v, r, s = _sign(devnet, signer_key or key, primary, AUTHORIZATION_FIELDS, message)
    return (frm, to, value, valid_after, valid_before, nonce, v, r, s)


def _transact(w3: Web3, fn: Any, sender: str, **extra: Any) -> Any:
    tx_hash = fn.transact({"from": sender, **extra})
    return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10, poll_latency=0.01)


def _addr(key: str) -> str:
    return Account.from_key(key).address


def _settler(devnet: Devnet) -> str:
    """A relayer that submits authorizations (any account can; the deployer here, as it is
    neither payer nor payee in these tests)."""
    return _addr(devnet.deployer_key)


# ---------------------------------------------------------------------------------------------
# devnet / accounts
# ---------------------------------------------------------------------------------------------


def test_dev_keys_match_default_mnemonic(w3: Web3) -> None:
    Account.enable_unaudited_hdwallet_features()
    derived = [Account.from_mnemonic(DEFAULT_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}") for i in range(10)]
    assert [a.key.to_0x_hex() for a in derived] == DEV_KEYS
    # ... and they are exactly the accounts anvil funds / unlocks.
    assert [a.address for a in derived] == list(w3.eth.accounts)


def test_deploy_roles_and_balances(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    assert devnet.chain_id == 31337 == w3.eth.chain_id
    assert devnet.token == Web3.to_checksum_address(devnet.token)
    assert devnet.deployer_key == DEV_KEYS[0]
    assert devnet.settler_key == DEV_KEYS[1]
    assert devnet.payee == _addr(DEV_KEYS[1])
    assert devnet.payer_keys == DEV_KEYS[2:]
    assert usdc.functions.name().call() == "USD Coin"
    assert usdc.functions.symbol().call() == "USDC"
    assert usdc.functions.decimals().call() == 6
    assert usdc.functions.version().call() == "2"
    assert usdc.functions.owner().call() == _addr(DEV_KEYS[0])
    assert usdc.functions.totalSupply().call() == 10 * MINT_PER_ACCOUNT
    for key in DEV_KEYS:
        assert usdc.functions.balanceOf(_addr(key)).call() == MINT_PER_ACCOUNT == 1_000_000 * 10**6


def test_deploy_is_idempotent(_token_anvil: str, devnet: Devnet, usdc: Contract) -> None:
    supply = usdc.functions.totalSupply().call()
    again = deploy_devnet(_token_anvil)
    assert again == devnet
    assert usdc.functions.totalSupply().call() == supply  # nobody topped up


def test_devnet_save_load_roundtrip(devnet: Devnet, tmp_path) -> None:
    path = tmp_path / "devnet.json"
    devnet.save(path)
    assert path.read_text().startswith("{\n")
    assert Devnet.load(path) == devnet


def test_domain_separator_matches_eip712(devnet: Devnet, usdc: Contract) -> None:
    from eth_account.messages import encode_typed_data

    encoded = encode_typed_data(_domain(devnet), {"Dummy": [{"name": "x", "type": "uint256"}]}, {"x": 1})
    assert usdc.functions.DOMAIN_SEPARATOR().call() == encoded.header


def test_mint_is_owner_only(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    with pytest.raises(ContractLogicError, match="caller is not the owner"):
        usdc.functions.mint(devnet.payee, 1).call({"from": devnet.payee})


# ---------------------------------------------------------------------------------------------
# EIP-3009
# ---------------------------------------------------------------------------------------------


def test_transfer_with_authorization_moves_exact_amount_once(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    payer_key = devnet.payer_keys[0]
    payer = _addr(payer_key)
    args = _authorization(devnet, payer_key, devnet.payee, 1_234_567)
    nonce = args[5]
    before_payer = usdc.functions.balanceOf(payer).call()
    before_payee = usdc.functions.balanceOf(devnet.payee).call()
    before_settler = usdc.functions.balanceOf(_settler(devnet)).call()
    assert usdc.functions.authorizationState(payer, nonce).call() is False

    receipt = _transact(w3, usdc.functions.transferWithAuthorization(*args), _settler(devnet))
    assert receipt["status"] == 1

    assert usdc.functions.balanceOf(payer).call() == before_payer - 1_234_567
    assert usdc.functions.balanceOf(devnet.payee).call() == before_payee + 1_234_567
    assert usdc.functions.balanceOf(_settler(devnet)).call() == before_settler
    assert usdc.functions.authorizationState(payer, nonce).call() is True
    used = usdc.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.authorizer, e.args.nonce) for e in used] == [(payer, nonce)]

    # Replaying the very same authorization must fail.
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        usdc.functions.transferWithAuthorization(*args).call({"from": _settler(devnet)})
    with pytest.raises(ContractLogicError):
        _transact(w3, usdc.functions.transferWithAuthorization(*args), _settler(devnet))
    assert usdc.functions.balanceOf(payer).call() == before_payer - 1_234_567


def test_cancel_authorization_blocks_later_use(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    payer_key = devnet.payer_keys[1]
    payer = _addr(payer_key)
    args = _authorization(devnet, payer_key, devnet.payee, 5)
    nonce = args[5]
    v, r, s = _sign(
        devnet,
        payer_key,
        "CancelAuthorization",
        [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        {"authorizer": payer, "nonce": nonce},
    )
    receipt = _transact(w3, usdc.functions.cancelAuthorization(payer, nonce, v, r, s), _settler(devnet))
    canceled = usdc.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.authorizer, e.args.nonce) for e in canceled] == [(payer, nonce)]
    assert usdc.functions.authorizationState(payer, nonce).call() is True
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        usdc.functions.transferWithAuthorization(*args).call({"from": _settler(devnet)})
    # A second cancel of the same nonce is rejected too.
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        usdc.functions.cancelAuthorization(payer, nonce, v, r, s).call({"from": _settler(devnet)})


def test_time_window_is_checked(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    key = devnet.payer_keys[2]
    now = w3.eth.get_block("latest")["timestamp"]
    expired = _authorization(devnet, key, devnet.payee, 1, valid_before=now - 1)
    with pytest.raises(ContractLogicError, match="authorization is expired"):
        usdc.functions.transferWithAuthorization(*expired).call({"from": _settler(devnet)})
    future = _authorization(devnet, key, devnet.payee, 1, valid_after=now + 3600)
    with pytest.raises(ContractLogicError, match="authorization is not yet valid"):
        usdc.functions.transferWithAuthorization(*future).call({"from": _settler(devnet)})


@pytest.mark.parametrize(
    ("after_delta", "before_delta", "ok"),
    [(-1, 1, True), (0, 1, False), (-1, 0, False)],
    ids=["inside", "validAfter==now", "validBefore==now"],
)
def test_time_window_bounds_are_exclusive(
    w3: Web3, devnet: Devnet, usdc: Contract, after_delta: int, before_delta: int, ok: bool
) -> None:
    """validAfter < block.timestamp < validBefore, checked in a mined block with a pinned time."""
    key = devnet.payer_keys[3]
    t = w3.eth.get_block("latest")["timestamp"] + 100
    args = _authorization(devnet, key, devnet.payee, 7, valid_after=t + after_delta, valid_before=t + before_delta)
    before = usdc.functions.balanceOf(devnet.payee).call()
    w3.provider.make_request("evm_setNextBlockTimestamp", [t])
    # Fixed gas: skip estimation so the transaction is mined (and reverts) in the pinned block.
    receipt = _transact(w3, usdc.functions.transferWithAuthorization(*args), _settler(devnet), gas=200_000)
    assert w3.eth.get_block(receipt["blockNumber"])["timestamp"] == t
    assert receipt["status"] == (1 if ok else 0)
    assert usdc.functions.balanceOf(devnet.payee).call() == before + (7 if ok else 0)


def test_wrong_signer_is_rejected(devnet: Devnet, usdc: Contract) -> None:
    payer_key = devnet.payer_keys[4]
    forged = _authorization(devnet, payer_key, devnet.payee, 1, signer_key=devnet.payer_keys[5])
    with pytest.raises(ContractLogicError, match="invalid signature"):
        usdc.functions.transferWithAuthorization(*forged).call({"from": _settler(devnet)})
    # Tampering with a signed field (the amount) also breaks the signature.
    good = list(_authorization(devnet, payer_key, devnet.payee, 1))
    good[2] = 2
    with pytest.raises(ContractLogicError, match="invalid signature"):
        usdc.functions.transferWithAuthorization(*good).call({"from": _settler(devnet)})


def test_high_s_and_bad_v_are_rejected(devnet: Devnet, usdc: Contract) -> None:
    frm, to, value, after, before, nonce, v, r, s = _authorization(devnet, devnet.payer_keys[4], devnet.payee, 1)
    # (r, n - s, flipped v) recovers the same signer but is the malleable twin: must be refused.
    high_s = (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big")
    flipped_v = 55 - v
    with pytest.raises(ContractLogicError, match="invalid signature 's' value"):
        usdc.functions.transferWithAuthorization(frm, to, value, after, before, nonce, flipped_v, r, high_s).call(
            {"from": _settler(devnet)}
        )
    with pytest.raises(ContractLogicError, match="invalid signature 'v' value"):
        usdc.functions.transferWithAuthorization(frm, to, value, after, before, nonce, v - 27, r, s).call(
            {"from": _settler(devnet)}
        )
    # A garbage signature that ecrecovers to address(0) is refused, never matched to from=0.
    with pytest.raises(ContractLogicError) as exc:
        usdc.functions.transferWithAuthorization(
            "0x" + "00" * 20, to, 0, after, before, nonce, 27, b"\x00" * 32, b"\x00" * 32
        ).call({"from": _settler(devnet)})
    assert exc.value.message == "execution reverted: ECDSA: invalid signature"


def test_receive_with_authorization_only_by_payee(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    payer_key = devnet.payer_keys[6]
    payer = _addr(payer_key)
    args = _authorization(devnet, payer_key, devnet.payee, 42, primary="ReceiveWithAuthorization")
    with pytest.raises(ContractLogicError, match="caller must be the payee"):
        usdc.functions.receiveWithAuthorization(*args).call({"from": _settler(devnet)})
    # A TransferWithAuthorization signature is not valid for receiveWithAuthorization.
    transfer_sig = _authorization(devnet, payer_key, devnet.payee, 42)
    with pytest.raises(ContractLogicError, match="invalid signature"):
        usdc.functions.receiveWithAuthorization(*transfer_sig).call({"from": devnet.payee})

    before = usdc.functions.balanceOf(payer).call()
    receipt = _transact(w3, usdc.functions.receiveWithAuthorization(*args), devnet.payee)
    assert receipt["status"] == 1
    assert usdc.functions.balanceOf(payer).call() == before - 42
    assert usdc.functions.authorizationState(payer, args[5]).call() is True


# ---------------------------------------------------------------------------------------------
# EIP-2612
# ---------------------------------------------------------------------------------------------


def test_permit_sets_allowance(w3: Web3, devnet: Devnet, usdc: Contract) -> None:
    owner_key = devnet.payer_keys[7]
    owner = _addr(owner_key)
    spender = _settler(devnet)
    nonce = usdc.functions.nonces(owner).call()
    deadline = w3.eth.get_block("latest")["timestamp"] + 3600
    fields = [
        {"name": "owner", "type": "address"},
        {"name": "spender", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ]
    message = {"owner": owner, "spender": spender, "value": 999, "nonce": nonce, "deadline": deadline}
    v, r, s = _sign(devnet, owner_key, "Permit", fields, message)

    receipt = _transact(w3, usdc.functions.permit(owner, spender, 999, deadline, v, r, s), devnet.payee)
    assert receipt["status"] == 1
    assert usdc.functions.allowance(owner, spender).call() == 999
    assert usdc.functions.nonces(owner).call() == nonce + 1
    # The permit nonce is consumed: the same signature cannot be replayed.
    with pytest.raises(ContractLogicError, match="invalid signature"):
        usdc.functions.permit(owner, spender, 999, deadline, v, r, s).call({"from": devnet.payee})

    # The allowance is usable through transferFrom.
    _transact(w3, usdc.functions.transferFrom(owner, devnet.payee, 999), spender)
    assert usdc.functions.allowance(owner, spender).call() == 0

    expired = {**message, "nonce": nonce + 1, "deadline": deadline - 7200}
    v, r, s = _sign(devnet, owner_key, "Permit", fields, expired)
    with pytest.raises(ContractLogicError, match="permit is expired"):
        usdc.functions.permit(owner, spender, 999, deadline - 7200, v, r, s).call({"from": devnet.payee})

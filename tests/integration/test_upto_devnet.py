"""x402 ``upto`` on the devnet: the official SDK's upto client and facilitator, unmodified, against our
Permit2 and upto proxy placed at the canonical addresses; tollway's own calldata (tollway.payments.
permit2) equal to the SDK's byte for byte; hostile settlements refused by the SDK or reverted on chain;
and the EIP-2612 path for a wallet with no Permit2 approval and no ETH.

Every payer, payee and facilitator here is a fresh account, so the shared session devnet's accounts
and balances are left as other tests expect them.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, NamedTuple

import pytest

try:  # the SDK's upto facilitator and EIP-2612 client import x402.extensions, which needs jsonschema
    import jsonschema  # noqa: F401
except ImportError as exc:  # fail, don't skip; x402[extensions] would also pin web3<8 (signinwithethereum)
    raise ImportError("the x402 SDK's upto scheme needs jsonschema: add it to the test extra") from exc
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from x402 import x402ClientSync, x402FacilitatorSync
from x402.extensions.eip2612_gas_sponsoring import declare_eip2612_gas_sponsoring_extension
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import UPTO_PERMIT2_WITNESS_TYPES, X402_UPTO_PERMIT2_PROXY_ABI
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.mechanisms.evm.upto import UptoEvmClientScheme, UptoEvmFacilitatorScheme
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo

from support import Chain, free_port
from tollway.devnet.anvil import DEV_KEYS, start_anvil
from tollway.devnet.canonical import CANONICAL, approve_permit2, install_canonical, runtime_code
from tollway.devnet.deploy import Devnet, deploy_devnet, token_contract
from tollway.payments import permit2

NETWORK = "eip155:31337"
MAX = 5_000_000  # 5 USDC authorized
cs = Web3.to_checksum_address
PROXY_ABI = [
    *X402_UPTO_PERMIT2_PROXY_ABI,
    {
        "type": "function",
        "name": "WITNESS_TYPE_STRING",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string"}],
    },
]

PERMIT2_VIEWS_ABI = [
    {
        "type": "function",
        "name": "DOMAIN_SEPARATOR",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "bytes32"}],
    },
    {
        "type": "function",
        "name": "nonceBitmap",
        "stateMutability": "view",
        "inputs": [{"name": "", "type": "address"}, {"name": "", "type": "uint256"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
]


def selector(signature: str) -> str:
    return "0x" + keccak(signature.encode())[:4].hex()


# -- fixtures ----------------------------------------------------------------------------------------


def funded_key(chain: Chain) -> str:
    """A fresh account holding ETH only (a facilitator pays gas)."""
    account = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])
    return "0x" + bytes(account.key).hex()


@pytest.fixture(scope="module")
def fac_key(chain: Chain) -> str:
    return funded_key(chain)


class Facilitator(NamedTuple):
    sdk: x402FacilitatorSync  # the SDK's facilitator with its upto scheme registered
    signer: FacilitatorWeb3Signer
    address: str


@pytest.fixture(scope="module")
def facilitator(devnet: Devnet, fac_key: str) -> Facilitator:
    """The SDK's own upto facilitator, on its web3 signer (a fresh account that pays the gas)."""
    signer = FacilitatorWeb3Signer(private_key=fac_key, rpc_url=devnet.rpc_url)
    return Facilitator(
        x402FacilitatorSync().register([NETWORK], UptoEvmFacilitatorScheme(signer)), signer, signer.address
    )


@pytest.fixture
def payee() -> str:
    return Account.create().address


@pytest.fixture
def approved_payer(chain: Chain) -> Any:
    """A fresh wallet holding 100 USDC that approved Permit2 (it needed ETH for that one transaction)."""
    account = chain.fund(100_000_000, eth=True)
    approve_permit2(chain.w3, chain.devnet.token, ["0x" + bytes(account.key).hex()])
    return account


def requirements(devnet: Devnet, pay_to: str, facilitator_address: str, amount: int = MAX) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="upto",
        network=NETWORK,
        asset=devnet.token,
        amount=str(amount),
        pay_to=pay_to,
        max_timeout_seconds=300,
        extra={
            "name": devnet.token_name,
            "version": devnet.token_version,
            "facilitatorAddress": facilitator_address,
            "assetTransferMethod": "permit2",
        },
    )


def sdk_client(signer: Any, devnet: Devnet) -> x402ClientSync:
    client = x402ClientSync().register(NETWORK, UptoEvmClientScheme(signer))
    client.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": devnet.token, "max_amount_per_payment": str(MAX)}]}
    )
    return client


def pay(
    signer: Any, req: PaymentRequirements, devnet: Devnet, extensions: dict[str, Any] | None = None
) -> PaymentPayload:
    """What the SDK client sends for the 402 offering ``req``."""
    required = PaymentRequired(
        resource=ResourceInfo(url="http://127.0.0.1/v1/chat/completions"), accepts=[req], extensions=extensions
    )
    return sdk_client(signer, devnet).create_payment_payload(required)


def at_amount(req: PaymentRequirements, amount: int) -> PaymentRequirements:
    """The settle-time requirements: the same offer, ``amount`` the actual charge."""
    return req.model_copy(update={"amount": str(amount)})


def tx_input(chain: Chain, tx_hash: str) -> bytes:
    return bytes(chain.w3.eth.get_transaction(tx_hash)["input"])


def revert_selector(chain: Chain, sender: str, data: bytes) -> str:
    """The custom error selector with which calling the proxy with ``data`` from ``sender`` reverts."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as info:
        chain.w3.eth.call({"from": cs(sender), "to": permit2.UPTO_PROXY_ADDRESS, "data": "0x" + data.hex()})
    return str(info.value.data)[:10]


def send(chain: Chain, key: str, data: bytes) -> Any:
    """Send ``data`` to the proxy from ``key`` (fixed gas: a revert is mined, not estimated away); the receipt."""
    account = Account.from_key(key)
    w3 = chain.w3
    tx = {
        "chainId": 31337,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "to": permit2.UPTO_PROXY_ADDRESS,
        "data": data,
        "gas": 300_000,
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
    }
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)


def sign_typed(account: Any, auth: permit2.UptoAuthorization) -> bytes:
    """``auth`` signed through eth-account's generic EIP-712 encoder, with the SDK's types."""
    message = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            **UPTO_PERMIT2_WITNESS_TYPES,
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": 31337, "verifyingContract": permit2.PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": cs(auth.token), "amount": auth.max_amount},
            "spender": cs(auth.spender),
            "nonce": auth.nonce,
            "deadline": auth.deadline,
            "witness": {"to": cs(auth.to), "facilitator": cs(auth.facilitator), "validAfter": auth.valid_after},
        },
    }
    return bytes(Account.sign_message(encode_typed_data(full_message=message), account.key).signature)


def authorization(owner: str, devnet: Devnet, to: str, fac: str, **over: Any) -> permit2.UptoAuthorization:
    fields: dict[str, Any] = {
        "owner": owner.lower(),
        "token": devnet.token.lower(),
        "max_amount": MAX,
        "spender": permit2.UPTO_PROXY_ADDRESS.lower(),
        "nonce": secrets.randbits(256),
        "deadline": int(time.time()) + 600,
        "to": to.lower(),
        "facilitator": fac.lower(),
        "valid_after": 0,
    }
    return permit2.UptoAuthorization(**{**fields, **over})


# -- the devnet hosts the canonical contracts --------------------------------------------------------


def test_devnet_hosts_the_canonical_contracts(chain: Chain, devnet: Devnet) -> None:
    for address, name in CANONICAL.items():
        assert bytes(chain.w3.eth.get_code(address)) == runtime_code(name)
    assert install_canonical(chain.w3) == []  # idempotent
    for key in DEV_KEYS:
        owner = Account.from_key(key).address
        assert chain.token.functions.allowance(owner, permit2.PERMIT2_ADDRESS).call() >= 2**255
    proxy = chain.w3.eth.contract(address=permit2.UPTO_PROXY_ADDRESS, abi=PROXY_ABI)
    assert proxy.functions.WITNESS_TYPE_STRING().call() == permit2.WITNESS_TYPE_STRING
    # Permit2's domain separator is computed at run time from the chain id and its own address.
    p2 = chain.w3.eth.contract(address=permit2.PERMIT2_ADDRESS, abi=PERMIT2_VIEWS_ABI)
    assert p2.functions.DOMAIN_SEPARATOR().call() == permit2.domain_separator(31337)


def test_deploy_devnet_reinstalls_what_a_devnet_lacks() -> None:
    """Re-attaching to a devnet without the contracts or approvals (one deployed before they existed)
    puts them back; nothing else changes."""
    port = free_port()
    proc = start_anvil(port)
    try:
        url = f"http://127.0.0.1:{port}"
        first = deploy_devnet(url)
        w3 = Web3(Web3.HTTPProvider(url))
        for address in CANONICAL:
            w3.provider.make_request("anvil_setCode", [address, "0x"])
        payer = Account.from_key(DEV_KEYS[3])
        token = token_contract(w3, first.token)
        tx = token.functions.approve(permit2.PERMIT2_ADDRESS, 0).build_transaction(
            {"from": payer.address, "nonce": w3.eth.get_transaction_count(payer.address)}
        )
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction))
        supply = token.functions.totalSupply().call()

        assert deploy_devnet(url) == first
        for address, name in CANONICAL.items():
            assert bytes(w3.eth.get_code(address)) == runtime_code(name)
        assert token.functions.allowance(payer.address, permit2.PERMIT2_ADDRESS).call() == 2**256 - 1
        assert token.functions.totalSupply().call() == supply
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- 1 + 2: the SDK's client and facilitator; tollway's calldata is the SDK's ------------------------


def test_sdk_upto_verifies_and_settles_less_than_the_max(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    scheme_extra = UptoEvmFacilitatorScheme(facilitator.signer).get_extra(NETWORK)
    assert scheme_extra == {"facilitatorAddress": fac_address}  # what a server puts into `extra`
    req = requirements(devnet, payee, fac_address)
    payment = pay(approved_payer, req, devnet)

    # The payload's exact shape.
    assert set(payment.payload) == {"permit2Authorization", "signature"}
    auth_doc = payment.payload["permit2Authorization"]
    assert set(auth_doc) == {"from", "permitted", "spender", "nonce", "deadline", "witness"}
    assert set(auth_doc["permitted"]) == {"token", "amount"}
    assert set(auth_doc["witness"]) == {"to", "facilitator", "validAfter"}
    assert auth_doc["spender"] == permit2.UPTO_PROXY_ADDRESS and auth_doc["witness"]["facilitator"] == fac_address
    auth, sig = permit2.decode_payload(payment.payload)
    assert permit2.signer(auth, sig, 31337) == approved_payer.address.lower()

    verified = fac.verify(payment, req)  # simulates settle(max) from the facilitator
    assert verified.is_valid, verified
    assert verified.payer == approved_payer.address

    charge = 1_234_567
    before = chain.balance(approved_payer.address), chain.balance(payee)
    settled = fac.settle(payment, at_amount(req, charge))
    assert settled.success, settled
    assert settled.amount == str(charge) and settled.transaction
    assert chain.balance(approved_payer.address) == before[0] - charge
    assert chain.balance(payee) == before[1] + charge
    assert chain.balance(permit2.UPTO_PROXY_ADDRESS) == chain.balance(permit2.PERMIT2_ADDRESS) == 0

    # 2. What the SDK facilitator sent is exactly tollway's calldata for this payload and amount.
    receipt = chain.receipt(settled.transaction)
    assert receipt["status"] == 1 and receipt["to"] == permit2.UPTO_PROXY_ADDRESS
    assert tx_input(chain, settled.transaction) == permit2.settle_calldata(auth, charge, sig)

    # The Permit2 nonce is spent: bit (nonce & 0xff) of word (nonce >> 8).
    p2 = chain.w3.eth.contract(address=permit2.PERMIT2_ADDRESS, abi=PERMIT2_VIEWS_ABI)
    word = p2.functions.nonceBitmap(approved_payer.address, auth.nonce >> 8).call()
    assert word >> (auth.nonce & 0xFF) & 1 == 1

    # 3. A settled payment cannot be settled again (the nonce is spent), by the SDK or on chain.
    again = fac.settle(payment, at_amount(req, 1))
    assert not again.success
    assert revert_selector(chain, fac_address, permit2.settle_calldata(auth, 1, sig)) == selector("InvalidNonce()")
    assert chain.balance(payee) == before[1] + charge


def test_settling_zero_sends_nothing(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    payment = pay(approved_payer, req, devnet)
    assert fac.verify(payment, req).is_valid
    nonce = chain.w3.eth.get_transaction_count(fac_address, "pending")
    settled = fac.settle(payment, at_amount(req, 0))
    assert settled.success and settled.transaction == "" and settled.amount == "0"
    assert chain.w3.eth.get_transaction_count(fac_address, "pending") == nonce  # no transaction
    assert chain.balance(payee) == 0
    # The proxy refuses a zero settlement itself; tollway's calldata builder too.
    auth, sig = permit2.decode_payload(payment.payload)
    data = bytearray(permit2.settle_calldata(auth, 1, sig))
    data[4 + 5 * 32 - 1] = 0  # the amount word
    assert revert_selector(chain, fac_address, bytes(data)) == selector("InvalidAmount()")
    with pytest.raises(ValueError):
        permit2.settle_calldata(auth, 0, sig)
    # The authorization is still good for a later, non-zero settlement.
    assert fac.settle(payment, at_amount(req, 10)).success
    assert chain.balance(payee) == 10


# -- 3: hostile settlements --------------------------------------------------------------------------


def test_witness_binds_the_payee(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    payment = pay(approved_payer, req, devnet)
    thief = Account.create().address
    # The SDK facilitator refuses to settle to another payee than the signed one...
    assert fac.verify(payment, requirements(devnet, thief, fac_address)).invalid_reason == (
        "invalid_permit2_recipient_mismatch"
    )
    assert not fac.settle(payment, at_amount(requirements(devnet, thief, fac_address), 1)).success
    # ... and on chain, a witness naming another payee breaks the payer's signature.
    auth, sig = permit2.decode_payload(payment.payload)
    redirected = permit2.UptoAuthorization(**{**auth.__dict__, "to": thief.lower()})
    assert revert_selector(chain, fac_address, permit2.settle_calldata(redirected, 1, sig)) == selector(
        "InvalidSigner()"
    )
    assert chain.balance(thief) == chain.balance(payee) == 0


def test_only_the_witness_facilitator_can_settle(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac_address = facilitator.address
    req = requirements(devnet, payee, fac_address)
    payment = pay(approved_payer, req, devnet)
    auth, sig = permit2.decode_payload(payment.payload)
    data = permit2.settle_calldata(auth, 1, sig)
    # On chain: anyone but the witness facilitator is refused, the payee and the payer included.
    for caller in (Account.create().address, payee, approved_payer.address, devnet.payee):
        assert revert_selector(chain, caller, data) == selector("UnauthorizedFacilitator()")
    # Another facilitator's SDK refuses the payment (and a witness naming it would not match the signature).
    other_signer = FacilitatorWeb3Signer(private_key=funded_key(chain), rpc_url=devnet.rpc_url)
    other = x402FacilitatorSync().register([NETWORK], UptoEvmFacilitatorScheme(other_signer))
    assert other.verify(payment, req).invalid_reason == "upto_facilitator_mismatch"
    assert not other.settle(payment, at_amount(req, 1)).success
    rebound = permit2.UptoAuthorization(**{**auth.__dict__, "facilitator": other_signer.address.lower()})
    assert revert_selector(chain, other_signer.address, permit2.settle_calldata(rebound, 1, sig)) == selector(
        "InvalidSigner()"
    )
    assert chain.balance(payee) == 0


def test_expired_and_early_permits_are_refused(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    now = chain.w3.eth.get_block("latest")["timestamp"]
    for over, sdk_reason, error in (
        ({"deadline": now - 1}, "permit2_deadline_expired", "SignatureExpired(uint256)"),
        ({"valid_after": now + 3600}, "permit2_not_yet_valid", "PaymentTooEarly()"),
    ):
        auth = authorization(approved_payer.address, devnet, payee, fac_address, **over)
        sig = sign_typed(approved_payer, auth)
        assert permit2.signer(auth, sig, 31337) == approved_payer.address.lower()
        assert revert_selector(chain, fac_address, permit2.settle_calldata(auth, 1, sig)) == selector(error)
        payload = {
            "permit2Authorization": {
                "from": approved_payer.address,
                "permitted": {"token": devnet.token, "amount": str(MAX)},
                "spender": permit2.UPTO_PROXY_ADDRESS,
                "nonce": str(auth.nonce),
                "deadline": str(auth.deadline),
                "witness": {"to": payee, "facilitator": fac_address, "validAfter": str(auth.valid_after)},
            },
            "signature": "0x" + sig.hex(),
        }
        payment = PaymentPayload(payload=payload, accepted=req)
        assert fac.verify(payment, req).invalid_reason == sdk_reason
        assert not fac.settle(payment, at_amount(req, 1)).success
    assert chain.balance(payee) == 0


def test_amount_above_the_permit_is_refused(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    payment = pay(approved_payer, req, devnet)
    settled = fac.settle(payment, at_amount(req, MAX + 1))
    assert not settled.success and settled.error_reason == "invalid_upto_evm_payload_settlement_exceeds_amount"
    auth, sig = permit2.decode_payload(payment.payload)
    proxy = chain.w3.eth.contract(address=permit2.UPTO_PROXY_ADDRESS, abi=X402_UPTO_PERMIT2_PROXY_ABI)
    permit = ((cs(auth.token), auth.max_amount), auth.nonce, auth.deadline)
    witness = (cs(auth.to), cs(auth.facilitator), auth.valid_after)
    data = proxy.encode_abi("settle", args=[permit, MAX + 1, cs(auth.owner), witness, sig])
    assert revert_selector(chain, fac_address, bytes.fromhex(data[2:])) == selector("AmountExceedsPermitted()")
    # Raising the permitted maximum in the calldata instead breaks the signature.
    raised = permit2.UptoAuthorization(**{**auth.__dict__, "max_amount": MAX + 1})
    assert revert_selector(chain, fac_address, permit2.settle_calldata(raised, MAX + 1, sig)) == selector(
        "InvalidSigner()"
    )
    # Exactly the max is fine.
    assert fac.settle(payment, at_amount(req, MAX)).success
    assert chain.balance(payee) == MAX


def test_signature_by_another_key_is_refused(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, approved_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    auth = authorization(approved_payer.address, devnet, payee, fac_address)
    forged = sign_typed(Account.create(), auth)
    assert revert_selector(chain, fac_address, permit2.settle_calldata(auth, 1, forged)) == selector("InvalidSigner()")
    payload = pay(approved_payer, req, devnet).payload  # a genuine payload, its signature replaced
    payload["signature"] = "0x" + sign_typed(Account.create(), permit2.decode_payload(payload)[0]).hex()
    payment = PaymentPayload(payload=payload, accepted=req)
    assert fac.verify(payment, req).invalid_reason == "invalid_permit2_signature"
    assert not fac.settle(payment, at_amount(req, 1)).success
    # A malleable (high-s) twin of a genuine signature is refused on chain too.
    genuine = sign_typed(approved_payer, auth)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    twin = genuine[:32] + (n - int.from_bytes(genuine[32:64], "big")).to_bytes(32, "big") + bytes([55 - genuine[64]])
    assert revert_selector(chain, fac_address, permit2.settle_calldata(auth, 1, twin)) == selector("InvalidSignature()")
    assert chain.balance(payee) == 0


# -- 4: a wallet with no Permit2 approval and no ETH, through eip2612GasSponsoring --------------------


@pytest.fixture
def bare_payer(chain: Chain) -> Any:
    account = chain.fund(100_000_000)  # USDC only: no ETH, no approval
    assert chain.w3.eth.get_balance(account.address) == 0
    assert chain.token.functions.allowance(account.address, permit2.PERMIT2_ADDRESS).call() == 0
    return account


def test_eip2612_gas_sponsoring_pays_from_a_bare_wallet(
    chain: Chain, devnet: Devnet, facilitator: Facilitator, fac_key: str, bare_payer: Any, payee: str
) -> None:
    fac, fac_address = facilitator.sdk, facilitator.address
    req = requirements(devnet, payee, fac_address)
    # Without the extension the SDK facilitator asks for the Permit2 approval first.
    plain = pay(bare_payer, req, devnet)
    assert fac.verify(plain, req).invalid_reason == "permit2_allowance_required"

    # The client needs chain reads (the token's permit nonce, the allowance) to sign the EIP-2612 permit.
    signer = EthAccountSignerWithRPC(bare_payer, devnet.rpc_url)
    payment = pay(signer, req, devnet, extensions=declare_eip2612_gas_sponsoring_extension())
    info = payment.extensions["eip2612GasSponsoring"]["info"]
    assert set(info) >= {"from", "asset", "spender", "amount", "nonce", "deadline", "signature", "version"}
    assert info["spender"] == permit2.PERMIT2_ADDRESS and info["amount"] == str(MAX)
    p2612 = permit2.decode_eip2612_permit(payment.extensions)
    assert p2612 is not None and p2612.owner == bare_payer.address.lower()

    verified = fac.verify(payment, req)  # simulates settleWithPermit
    assert verified.is_valid, verified
    charge = 2_000_001
    settled = fac.settle(payment, at_amount(req, charge))
    assert settled.success, settled
    assert chain.balance(payee) == charge
    assert chain.balance(bare_payer.address) == 100_000_000 - charge
    assert chain.w3.eth.get_balance(bare_payer.address) == 0
    # The permit allowed Permit2 the maximum; Permit2 used the charge.
    assert chain.token.functions.allowance(bare_payer.address, permit2.PERMIT2_ADDRESS).call() == MAX - charge
    auth, sig = permit2.decode_payload(payment.payload)
    assert tx_input(chain, settled.transaction) == permit2.settle_with_permit_calldata(p2612, auth, charge, sig)

    # The same (now used) EIP-2612 permit with a new Permit2 payment: the permit fails, but Permit2's
    # allowance still covers the charge, so settleWithPermit goes on.
    second = pay(bare_payer, req, devnet)
    auth2, sig2 = permit2.decode_payload(second.payload)
    receipt = send(chain, fac_key, permit2.settle_with_permit_calldata(p2612, auth2, 1_000, sig2))
    assert receipt["status"] == 1
    failed = keccak(b"EIP2612PermitFailed(address,address,bytes)")
    assert any(bytes(log["topics"][0]) == failed for log in receipt["logs"])
    assert chain.balance(payee) == charge + 1_000

    # When the allowance does not cover the charge, the permit's failure is the revert.
    third = pay(bare_payer, req, devnet)
    auth3, sig3 = permit2.decode_payload(third.payload)
    data = permit2.settle_with_permit_calldata(p2612, auth3, MAX, sig3)
    assert revert_selector(chain, fac_address, data) == selector("Permit2612Failed(bytes)")


def test_settle_with_permit_from_tollway_calldata(
    chain: Chain, devnet: Devnet, fac_key: str, bare_payer: Any, payee: str
) -> None:
    """tollway settling an eip2612GasSponsoring payment itself, from the facilitator account."""
    fac = Account.from_key(fac_key)
    req = requirements(devnet, payee, fac.address)
    signer = EthAccountSignerWithRPC(bare_payer, devnet.rpc_url)
    payment = pay(signer, req, devnet, extensions=declare_eip2612_gas_sponsoring_extension())
    auth, sig = permit2.decode_payload(payment.payload)
    p2612 = permit2.decode_eip2612_permit(payment.extensions)
    assert p2612 is not None
    data = permit2.settle_with_permit_calldata(p2612, auth, 42, sig)
    # Only the witness facilitator may submit it.
    assert revert_selector(chain, payee, data) == selector("UnauthorizedFacilitator()")
    assert send(chain, fac_key, data)["status"] == 1
    assert chain.balance(payee) == 42
    assert chain.balance(bare_payer.address) == 100_000_000 - 42

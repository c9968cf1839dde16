"""x402 ``batch-settlement`` on the devnet: the official SDK's batch-settlement client and facilitator,
unmodified, against our escrow and deposit collectors (and Multicall3) placed at the canonical addresses.

1. Payloads made by the SDK's client (ERC-3009 and Permit2 deposits, vouchers, refunds) are verified
   and settled by the SDK's facilitator on its web3 signer; the resource server's part is played with
   the SDK's own server-side records and channel manager (claim several channels at once, settle,
   refund); balances move exactly as expected.
2. tollway's :mod:`tollway.payments.channel` computes the same channel ids and digests and builds
   the same calldata, byte for byte, as the SDK sends.
3. Hostile claims, vouchers and refunds are refused by the SDK or reverted on chain, and nothing is
   paid twice.
4. The timed withdrawal, on an anvil of this test's own (its clock is moved).

Every payer, receiver, authorizer and facilitator here is a fresh account, so the shared session
devnet's accounts and balances are left as other tests expect them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

try:  # the SDK's Permit2 deposit paths import x402.extensions, which needs jsonschema
    import jsonschema  # noqa: F401
except ImportError as exc:  # fail, don't skip
    raise ImportError("the x402 SDK's batch-settlement scheme needs jsonschema: add it to the test extra") from exc
from eth_account import Account
from eth_hash.auto import keccak
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD
from x402 import x402ClientSync, x402FacilitatorSync
from x402.extensions.eip2612_gas_sponsoring import declare_eip2612_gas_sponsoring_extension
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
    RefundOptions,
    process_payment_response,
    sign_voucher,
)
from x402.mechanisms.evm.batch_settlement.errors import (
    ERR_CLAIM_SIMULATION_FAILED,
    ERR_CUMULATIVE_AMOUNT_BELOW_CLAIMED,
    ERR_CUMULATIVE_EXCEEDS_BALANCE,
    ERR_DEPOSIT_SIMULATION_FAILED,
    ERR_INVALID_VOUCHER_SIGNATURE,
)
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.facilitator.utils import to_contract_channel_config
from x402.mechanisms.evm.batch_settlement.server import (
    BatchSettlementChannelManagerSync,
    BatchSettlementEvmSchemeServerConfig,
    Channel,
    ChannelManagerConfigSync,
    InMemoryChannelStorage,
)
from x402.mechanisms.evm.batch_settlement.server import BatchSettlementEvmScheme as ServerScheme
from x402.mechanisms.evm.batch_settlement.server.channel_manager_common import (
    build_claim_payment_payload,
    build_payment_requirements,
    build_refund_claims,
    build_refund_payment_payload,
)
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner, EthAccountSignerWithRPC
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse

from support import Chain, free_port
from tollway.devnet.anvil import start_anvil
from tollway.devnet.canonical import CANONICAL, MULTICALL3_ADDRESS, approve_permit2, install_canonical, runtime_code
from tollway.devnet.deploy import Devnet, deploy_devnet, load_artifact
from tollway.payments import channel, permit2

NETWORK = "eip155:31337"
CHAIN_ID = 31337
PRICE = 1_000_000  # the most one request may cost (PaymentRequirements.amount): 1 USDC
DEPOSIT = 10_000_000  # every channel here opens with 10 USDC (extra.minDeposit)
DELAY = 900  # the channels' withdraw delay: the escrow's minimum
URL = "http://127.0.0.1/v1/chat/completions"
ESCROW_ABI = load_artifact("X402BatchSettlement")["abi"]
cs = Web3.to_checksum_address


def selector(signature: str) -> str:
    return "0x" + keccak(signature.encode())[:4].hex()


def hexb(data: bytes) -> str:
    return "0x" + data.hex()


def funded_key(w3: Web3) -> str:
    """A fresh account holding ETH only (for gas)."""
    account = Account.create()
    w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])
    return "0x" + bytes(account.key).hex()


def escrow(w3: Web3) -> Any:
    return w3.eth.contract(address=channel.BATCH_SETTLEMENT_ADDRESS, abi=ESCROW_ABI)


def revert_selector(w3: Web3, sender: str, data: bytes, to: str = channel.BATCH_SETTLEMENT_ADDRESS) -> str:
    """The custom error selector with which calling ``to`` with ``data`` from ``sender`` reverts."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as info:
        w3.eth.call({"from": cs(sender), "to": cs(to), "data": hexb(data)})
    return str(info.value.data)[:10]


def send(w3: Web3, key: str, data: bytes, to: str = channel.BATCH_SETTLEMENT_ADDRESS) -> Any:
    """Send ``data`` from ``key`` (fixed gas: a revert is mined, not estimated away); the receipt."""
    account = Account.from_key(key)
    tx = {
        "chainId": CHAIN_ID,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "to": cs(to),
        "data": data,
        "gas": 500_000,
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
    }
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)


def tx_input(w3: Web3, tx_hash: str) -> bytes:
    return bytes(w3.eth.get_transaction(tx_hash)["input"])


def on_chain(w3: Web3, cid: bytes) -> tuple[int, int]:
    """(balance, totalClaimed) of a channel."""
    balance, claimed = escrow(w3).functions.channels(cid).call()
    return int(balance), int(claimed)


def receiver_totals(w3: Web3, receiver: str, token: str) -> tuple[int, int]:
    claimed, settled = escrow(w3).functions.receivers(cs(receiver), cs(token)).call()
    return int(claimed), int(settled)


def local_config(config: SdkConfig) -> channel.ChannelConfig:
    return channel.ChannelConfig(
        payer=config.payer.lower(),
        payer_authorizer=config.payer_authorizer.lower(),
        receiver=config.receiver.lower(),
        receiver_authorizer=config.receiver_authorizer.lower(),
        token=config.token.lower(),
        withdraw_delay=config.withdraw_delay,
        salt=bytes.fromhex(config.salt[2:]),
    )


def as_tuple(c: channel.ChannelConfig) -> tuple[Any, ...]:
    """A config as web3 takes the ABI's ChannelConfig tuple."""
    return (
        cs(c.payer),
        cs(c.payer_authorizer),
        cs(c.receiver),
        cs(c.receiver_authorizer),
        cs(c.token),
        c.withdraw_delay,
        c.salt,
    )


def authorized_claim(w3: Web3, rows: list[channel.Claim], key: Any) -> bytes:
    """``claimWithSignature`` of ``rows`` (any rows: web3's encoder, no sanity checks), the batch signed
    with ``key``."""
    sig = bytes(Account.unsafe_sign_hash(channel.claim_batch_digest(rows, CHAIN_ID), key).signature)
    args = [((as_tuple(r.config), r.max_claimable), r.signature, r.total_claimed) for r in rows]
    return bytes.fromhex(escrow(w3).encode_abi("claimWithSignature", args=[args, sig])[2:])


def encode(w3: Web3, fn: str, *args: Any) -> bytes:
    return bytes.fromhex(escrow(w3).encode_abi(fn, args=list(args))[2:])


def local_claim(c: VoucherClaim) -> channel.Claim:
    return channel.Claim(
        local_config(c.channel), int(c.max_claimable_amount), bytes.fromhex(c.signature[2:]), int(c.total_claimed)
    )


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the parties --------------------------------------------------------------------------------------


def sdk_facilitator(rpc_url: str, key: str) -> x402FacilitatorSync:
    """The SDK's own batch-settlement facilitator on its web3 signer (a fresh account that pays gas)."""
    signer = FacilitatorWeb3Signer(private_key=key, rpc_url=rpc_url)
    return x402FacilitatorSync().register([NETWORK], BatchSettlementEvmFacilitator(signer))


@pytest.fixture(scope="module")
def fac_key(chain: Chain) -> str:
    return funded_key(chain.w3)


@pytest.fixture(scope="module")
def facilitator(devnet: Devnet, fac_key: str) -> x402FacilitatorSync:
    return sdk_facilitator(devnet.rpc_url, fac_key)


@dataclass
class Server:
    """The resource server: its receiver and receiver-authorizer key (it signs its own claims and
    refunds), the SDK server scheme's channel records (kept here as its verify/settle hooks keep
    them) and the SDK's channel manager (claims, settles and refunds through the facilitator)."""

    receiver: str
    receiver_key: str  # (it can claim directly, with gas)
    authorizer: Any
    token: str
    scheme: ServerScheme
    manager: BatchSettlementChannelManagerSync
    facilitator: x402FacilitatorSync

    @classmethod
    def create(cls, devnet: Devnet, facilitator: x402FacilitatorSync) -> Server:
        receiver_account, authorizer = Account.create(), Account.create()
        receiver = receiver_account.address
        scheme = ServerScheme(
            receiver,
            BatchSettlementEvmSchemeServerConfig(
                storage=InMemoryChannelStorage(),
                receiver_authorizer_signer=LocalAuthorizerSigner(authorizer),
                withdraw_delay=DELAY,
            ),
        )
        manager = BatchSettlementChannelManagerSync(
            ChannelManagerConfigSync(
                scheme=scheme, facilitator=facilitator, receiver=receiver, token=devnet.token, network=NETWORK
            )
        )
        return cls(
            receiver, "0x" + bytes(receiver_account.key).hex(), authorizer, devnet.token, scheme, manager, facilitator
        )

    def requirements(self, devnet: Devnet, method: str | None = None) -> PaymentRequirements:
        """The offer in a 402, as the SDK server scheme completes it."""
        extra: dict[str, Any] = {
            "receiverAuthorizer": self.authorizer.address,
            "withdrawDelay": DELAY,
            "name": devnet.token_name,
            "version": devnet.token_version,
            "minDeposit": str(DEPOSIT),
        }
        if method:
            extra["assetTransferMethod"] = method
        return PaymentRequirements(
            scheme="batch-settlement",
            network=NETWORK,
            asset=devnet.token,
            amount=str(PRICE),
            pay_to=self.receiver,
            max_timeout_seconds=300,
            extra=extra,
        )

    def record(self, channel_id: str) -> Channel | None:
        return self.scheme.get_storage().get(channel_id)

    def put(self, record: Channel | None, channel_id: str) -> None:
        self.scheme.get_storage().update_channel(channel_id, lambda _current: record)

    def serve(self, payment: PaymentPayload, req: PaymentRequirements, charge: int) -> SettleResponse:
        """A paid request: the server's cumulative check, the facilitator's verify (and settle, for a
        deposit), then the charge committed (charge <= req.amount), as the SDK server does."""
        raw = payment.payload
        cid = raw["voucher"]["channelId"].lower()
        current = self.record(cid)
        charged = int(current.charged_cumulative_amount) if current else 0
        # The server's rule: the voucher's ceiling is exactly what was charged so far plus this price.
        assert int(raw["voucher"]["maxClaimableAmount"]) == charged + int(req.amount)
        verified = self.facilitator.verify(payment, req)
        assert verified.is_valid, verified
        state, tx, amount = dict(verified.extra or {}), "", ""
        if raw["type"] == "deposit":
            settled = self.facilitator.settle(payment, req)
            assert settled.success, settled
            state, tx, amount = settled.extra["channelState"], settled.transaction, settled.amount
        assert 0 <= charge <= int(req.amount)
        record = Channel(
            channel_id=cid,
            channel_config=SdkConfig.from_dict(raw["channelConfig"]),
            charged_cumulative_amount=str(charged + charge),
            signed_max_claimable=str(raw["voucher"]["maxClaimableAmount"]),
            signature=raw["voucher"]["signature"],
            balance=str(state["balance"]),
            total_claimed=str(state["totalClaimed"]),
            withdraw_requested_at=int(state["withdrawRequestedAt"]),
            refund_nonce=int(state["refundNonce"]),
            onchain_synced_at=now_ms(),
            last_request_timestamp=now_ms(),
        )
        self.put(record, cid)
        channel_state = {
            "channelId": cid,
            "balance": record.balance,
            "totalClaimed": record.total_claimed,
            "withdrawRequestedAt": record.withdraw_requested_at,
            "refundNonce": str(record.refund_nonce),
            "chargedCumulativeAmount": record.charged_cumulative_amount,
        }
        return SettleResponse(
            success=True,
            transaction=tx,
            network=NETWORK,
            payer=raw["channelConfig"]["payer"],
            amount=amount,
            extra={"chargedAmount": str(charge), "channelState": channel_state},
        )

    # -- the cooperative refund endpoint (the SDK client's `refund` talks to this) --

    def refund_fetch(
        self, req: PaymentRequirements, seen: list[tuple[PaymentPayload, SettleResponse]]
    ) -> Callable[..., Any]:
        """A ``fetch`` for the SDK client's ``refund``: the probe gets the 402; the refund payload is
        verified (zero-charge: its ceiling is what was charged), completed as the SDK server's
        ``enrich_settlement_payload`` does (amount, refund nonce, the claim of what is owed, both
        receiver-authorizer signatures) and settled by the facilitator."""

        def fetch(url: str, headers: Mapping[str, str]) -> Response:
            if "PAYMENT-SIGNATURE" not in headers:
                required = PaymentRequired(error="payment required", resource=ResourceInfo(url=url), accepts=[req])
                return Response(402, {"PAYMENT-REQUIRED": encode_payment_required_header(required)})
            payment = decode_payment_signature_header(headers["PAYMENT-SIGNATURE"])
            raw = payment.payload
            assert raw["type"] == "refund"
            cid = raw["voucher"]["channelId"].lower()
            record = self.record(cid)
            assert record is not None
            assert int(raw["voucher"]["maxClaimableAmount"]) == int(record.charged_cumulative_amount)
            verified = self.facilitator.verify(payment, req)
            assert verified.is_valid, verified
            state = verified.extra or {}
            record = record.copy()
            record.signed_max_claimable = str(raw["voucher"]["maxClaimableAmount"])
            record.signature = raw["voucher"]["signature"]
            record.balance, record.total_claimed = str(state["balance"]), str(state["totalClaimed"])
            record.refund_nonce = int(state["refundNonce"])
            claims = build_refund_claims(record)
            remainder = int(record.balance) - int(record.charged_cumulative_amount)
            amount = str(raw.get("amount") or remainder)
            nonce = str(record.refund_nonce)
            signer = LocalAuthorizerSigner(self.authorizer)
            enriched = build_refund_payment_payload(
                record,
                claims,
                req,
                amount,
                nonce,
                sign_refund(signer, cid, amount, nonce, NETWORK),
                sign_claim_batch(signer, claims, NETWORK) if claims else None,
            )
            settled = self.facilitator.settle(enriched, req)
            assert settled.success, settled
            seen.append((payment, settled))
            after = settled.extra["channelState"]
            if int(after["balance"]) <= int(record.charged_cumulative_amount):
                self.put(None, cid)  # drained: the SDK server forgets the channel
            else:
                record.balance, record.total_claimed = after["balance"], after["totalClaimed"]
                record.refund_nonce = int(after["refundNonce"])
                self.put(record, cid)
            extra = {**settled.extra}
            extra["channelState"] = {**after, "chargedCumulativeAmount": record.charged_cumulative_amount}
            response = settled.model_copy(update={"extra": extra})
            return Response(200, {"PAYMENT-RESPONSE": encode_payment_response_header(response)})

        return fetch


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@pytest.fixture
def server(devnet: Devnet, facilitator: x402FacilitatorSync) -> Server:
    return Server.create(devnet, facilitator)


class Payer:
    """A wallet paying with the SDK's batch-settlement client (its own channel storage)."""

    def __init__(self, account: Any, devnet: Devnet, signer: Any = None) -> None:
        self.account = account
        self.storage = InMemoryClientChannelStorage()
        self.scheme = BatchSettlementEvmScheme(signer or account, BatchSettlementEvmSchemeOptions(storage=self.storage))
        self.client = x402ClientSync().register(NETWORK, self.scheme)
        self.client.set_spend_controls(
            {"allowed_assets": [{"network": NETWORK, "asset": devnet.token, "max_amount_per_payment": str(DEPOSIT)}]}
        )

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def key(self) -> str:
        return "0x" + bytes(self.account.key).hex()

    def pay(self, req: PaymentRequirements, extensions: dict[str, Any] | None = None) -> PaymentPayload:
        """What the SDK client sends for the 402 offering ``req``."""
        required = PaymentRequired(resource=ResourceInfo(url=URL), accepts=[req], extensions=extensions)
        return self.client.create_payment_payload(required)

    def receive(self, payment: PaymentPayload, response: SettleResponse) -> None:
        """The SDK client's handling of the PAYMENT-RESPONSE header of a paid response."""
        raw = payment.payload
        local: dict[str, str] = {"channel_id": raw["voucher"]["channelId"], "request_amount": payment.accepted.amount}
        if raw["type"] == "deposit":
            local["deposit_amount"] = raw["deposit"]["amount"]
        header = encode_payment_response_header(response)
        process_payment_response(self.storage, lambda name: header if name == "PAYMENT-RESPONSE" else None, local)  # type: ignore[arg-type]

    def request(
        self, server: Server, req: PaymentRequirements, charge: int, extensions: dict[str, Any] | None = None
    ) -> tuple[PaymentPayload, SettleResponse]:
        payment = self.pay(req, extensions)
        response = server.serve(payment, req, charge)
        self.receive(payment, response)
        return payment, response

    def config(self, req: PaymentRequirements) -> SdkConfig:
        return self.scheme.build_channel_config(req)


# -- the devnet hosts the contracts -------------------------------------------------------------------


def test_devnet_hosts_the_batch_settlement_contracts(chain: Chain, devnet: Devnet) -> None:
    for address in (
        channel.BATCH_SETTLEMENT_ADDRESS,
        channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        channel.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
        MULTICALL3_ADDRESS,
    ):
        assert bytes(chain.w3.eth.get_code(address)) == runtime_code(CANONICAL[address])
    assert install_canonical(chain.w3) == []  # idempotent
    contract = escrow(chain.w3)
    # The EIP-712 domain is computed at run time from the chain id and the escrow's own address.
    assert contract.functions.DOMAIN_SEPARATOR().call() == channel.domain_separator(CHAIN_ID)
    config = channel.ChannelConfig(
        payer=Account.create().address.lower(),
        payer_authorizer=channel.ZERO_ADDRESS,
        receiver=Account.create().address.lower(),
        receiver_authorizer=Account.create().address.lower(),
        token=devnet.token.lower(),
        withdraw_delay=DELAY,
        salt=bytes(range(32)),
    )
    cid = channel.channel_id(config, CHAIN_ID)
    as_tuple = (
        cs(config.payer),
        config.payer_authorizer,
        cs(config.receiver),
        cs(config.receiver_authorizer),
        cs(config.token),
        DELAY,
        config.salt,
    )
    assert contract.functions.getChannelId(as_tuple).call() == cid
    assert contract.functions.getVoucherDigest(cid, 12345).call() == channel.voucher_digest(cid, 12345, CHAIN_ID)
    assert contract.functions.getRefundDigest(cid, 7, 99).call() == channel.refund_digest(cid, 7, 99, CHAIN_ID)
    rows = [channel.Claim(config, 50, b"\x01" * 65, 40), channel.Claim(config, 70, b"\x02" * 65, 70)]
    claim_args = [((as_tuple, r.max_claimable), r.signature, r.total_claimed) for r in rows]
    assert contract.functions.getClaimBatchDigest(claim_args).call() == channel.claim_batch_digest(rows, CHAIN_ID)
    assert contract.functions.channels(cid).call() == [0, 0]
    # The collectors take orders from the escrow only.
    stranger = Account.create().address
    for collector in (channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS, channel.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS):
        data = keccak(b"collect(address,address,uint256,bytes32,bytes)")[:4] + bytes(5 * 32)
        assert revert_selector(chain.w3, stranger, data, collector) == selector("OnlyBatchSettlement()")


# -- 1 + 2: deposits, vouchers, one claim for several channels, settle --------------------------------


def test_sdk_deposits_vouchers_claim_and_settle(
    chain: Chain, devnet: Devnet, facilitator: x402FacilitatorSync, fac_key: str, server: Server
) -> None:
    w3, token = chain.w3, devnet.token
    req, req_p2 = server.requirements(devnet), server.requirements(devnet, "permit2")
    alice, bob = Payer(chain.fund(50_000_000), devnet), Payer(chain.fund(50_000_000), devnet)
    carol = Payer(chain.fund(50_000_000, eth=True), devnet)  # Permit2: she approves it once (needs gas)
    approve_permit2(w3, token, [carol.key])

    # Alice: a deposit with her first request, then two voucher-only requests.
    payment, response = alice.request(server, req, 700_000)
    raw = payment.payload
    assert raw["type"] == "deposit" and raw["deposit"]["amount"] == str(DEPOSIT)
    assert raw["voucher"]["maxClaimableAmount"] == str(PRICE)  # nothing charged yet + this request's price
    assert response.transaction and response.amount == str(DEPOSIT)
    decoded = channel.decode_payload(raw)
    assert decoded.deposit is not None
    cid_alice = channel.channel_id(decoded.config, CHAIN_ID)
    assert hexb(cid_alice) == compute_channel_id(alice.config(req), NETWORK) == raw["voucher"]["channelId"]
    as_tuple = to_contract_channel_config(alice.config(req))
    assert escrow(w3).functions.getChannelId(as_tuple).call() == cid_alice
    # The facilitator's deposit transaction is exactly tollway's calldata; the collector pulled the deposit.
    assert tx_input(w3, response.transaction) == channel.deposit_calldata(decoded.config, decoded.deposit)
    assert chain.balance(alice.address) == 50_000_000 - DEPOSIT
    assert chain.balance(channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS) == 0
    assert on_chain(w3, cid_alice) == (DEPOSIT, 0)
    assert channel.voucher_signer(decoded.voucher, CHAIN_ID) == alice.address.lower()

    payment, _ = alice.request(server, req, PRICE)
    assert payment.payload["type"] == "voucher"
    assert payment.payload["voucher"]["maxClaimableAmount"] == str(700_000 + PRICE)
    payment, _ = alice.request(server, req, 250_000)
    assert payment.payload["voucher"]["maxClaimableAmount"] == str(1_700_000 + PRICE)
    assert chain.balance(alice.address) == 50_000_000 - DEPOSIT  # vouchers move nothing

    # Bob: one request. Carol: a Permit2 deposit, then a voucher.
    bob.request(server, req, PRICE)
    payment, response = carol.request(server, req_p2, 300_000)
    decoded = channel.decode_payload(payment.payload)
    assert decoded.deposit is not None and isinstance(decoded.deposit.authorization, channel.Permit2Deposit)
    assert (
        channel.recover(
            channel.permit2_deposit_digest(decoded.deposit.authorization, CHAIN_ID),
            decoded.deposit.authorization.signature,
        )
        == carol.address.lower()
    )
    assert tx_input(w3, response.transaction) == channel.deposit_calldata(decoded.config, decoded.deposit)
    carol.request(server, req_p2, 500_000)
    assert chain.balance(channel.BATCH_SETTLEMENT_ADDRESS) >= 3 * DEPOSIT
    charged = {alice.address: 1_950_000, bob.address: PRICE, carol.address: 800_000}
    total = sum(charged.values())

    # One claimWithSignature for the three channels, by the SDK channel manager through the facilitator.
    claims = server.manager.get_claimable_vouchers()
    assert len(claims) == 3
    results = server.manager.claim()
    assert len(results) == 1 and results[0].vouchers == 3
    rows = [local_claim(c) for c in claims]
    assert {r.config.payer: r.total_claimed for r in rows} == {k.lower(): v for k, v in charged.items()}
    signature = sign_claim_batch(LocalAuthorizerSigner(server.authorizer), claims, NETWORK)
    assert channel.recover(channel.claim_batch_digest(rows, CHAIN_ID), bytes.fromhex(signature[2:])) == (
        server.authorizer.address.lower()
    )
    claim_tx = results[0].transaction
    assert tx_input(w3, claim_tx) == channel.claim_with_signature_calldata(rows, bytes.fromhex(signature[2:]))
    for r in rows:
        assert on_chain(w3, channel.channel_id(r.config, CHAIN_ID)) == (DEPOSIT, r.total_claimed)
    assert receiver_totals(w3, server.receiver, token) == (total, 0)
    assert chain.balance(server.receiver) == 0  # a claim moves accounting only

    # Settle: one transfer of everything claimed, to the receiver.
    escrow_before = chain.balance(channel.BATCH_SETTLEMENT_ADDRESS)
    settle_tx = server.manager.settle().transaction
    assert tx_input(w3, settle_tx) == channel.settle_calldata(server.receiver, token)
    assert chain.balance(server.receiver) == total
    assert chain.balance(channel.BATCH_SETTLEMENT_ADDRESS) == escrow_before - total
    assert receiver_totals(w3, server.receiver, token) == (total, total)
    settled_log = escrow(w3).events.Settled().process_receipt(chain.receipt(settle_tx), errors=DISCARD)
    assert [dict(e["args"]) for e in settled_log] == [
        {"receiver": server.receiver, "token": cs(token), "sender": Account.from_key(fac_key).address, "amount": total}
    ]

    # 3. Nothing twice: the same claim again changes nothing, and there is nothing left to settle.
    relayer = funded_key(w3)
    assert send(w3, relayer, tx_input(w3, claim_tx))["status"] == 1
    assert receiver_totals(w3, server.receiver, token) == (total, total)
    for r in rows:
        assert on_chain(w3, channel.channel_id(r.config, CHAIN_ID))[1] == r.total_claimed
    again = facilitator.settle(
        build_claim_payment_payload(claims, build_payment_requirements(server.receiver, token, NETWORK), signature),
        build_payment_requirements(server.receiver, token, NETWORK),
    )
    assert again.success  # a no-op claim is not an error (a refund's claim row is often one)
    with pytest.raises(RuntimeError, match="nothing_to_settle"):
        server.manager.settle()
    assert send(w3, relayer, channel.settle_calldata(server.receiver, token))["status"] == 1
    assert chain.balance(server.receiver) == total
    # The client's view: what it was charged, its deposit.
    ctx = alice.storage.get(hexb(cid_alice))
    assert ctx is not None and (ctx.charged_cumulative_amount, ctx.balance) == ("1950000", str(DEPOSIT))


# -- 1 + 2: cooperative refunds, through the SDK client's own refund request --------------------------


def test_sdk_cooperative_refund_partial_then_full(
    chain: Chain, devnet: Devnet, facilitator: x402FacilitatorSync, server: Server
) -> None:
    w3, token = chain.w3, devnet.token
    req = server.requirements(devnet)
    payer = Payer(chain.fund(20_000_000, eth=True), devnet)
    payer.request(server, req, 600_000)
    payer.request(server, req, 400_000)  # charged 1 USDC, nothing claimed yet
    config = payer.config(req)
    local = local_config(config)
    cid = channel.channel_id(local, CHAIN_ID)
    contract = escrow(w3)
    # The payer starts a timed withdrawal of 3 USDC: a cooperative refund reduces it.
    as_tuple = to_contract_channel_config(config)
    data = bytes.fromhex(contract.encode_abi("initiateWithdraw", args=[as_tuple, 3_000_000])[2:])
    assert send(w3, payer.key, data)["status"] == 1
    assert contract.functions.pendingWithdrawals(cid).call()[0] == 3_000_000

    # A partial refund of 2 USDC: the server claims what it charged and refunds, in one multicall.
    seen: list[SettleResponse] = []
    response = payer.scheme.refund(URL, RefundOptions(amount="2000000", fetch=server.refund_fetch(req, seen)))
    assert response.success and response.amount == "2000000"
    assert response.extra["channelState"]["balance"] == str(DEPOSIT - 2_000_000)
    assert chain.balance(payer.address) == 20_000_000 - DEPOSIT + 2_000_000
    assert on_chain(w3, cid) == (DEPOSIT - 2_000_000, 1_000_000)
    assert contract.functions.refundNonce(cid).call() == 1
    assert contract.functions.pendingWithdrawals(cid).call()[0] == 1_000_000  # 3 - 2
    assert receiver_totals(w3, server.receiver, token) == (1_000_000, 0)
    # What the facilitator sent is tollway's multicall([claimWithSignature, refundWithSignature]): the
    # claim row carries the payer's zero-charge refund voucher; the server's signatures are deterministic.
    refund_payload, settled = seen[0]
    voucher = channel.decode_payload(refund_payload.payload).voucher
    assert (voucher.channel_id, voucher.max_claimable) == (cid, 1_000_000)
    assert channel.voucher_signer(voucher, CHAIN_ID) == payer.address.lower()
    claim_row = channel.Claim(local, 1_000_000, voucher.signature, 1_000_000)
    auth_key = server.authorizer.key
    claim_sig = bytes(Account.unsafe_sign_hash(channel.claim_batch_digest([claim_row], CHAIN_ID), auth_key).signature)
    refund_sig = bytes(Account.unsafe_sign_hash(channel.refund_digest(cid, 0, 2_000_000, CHAIN_ID), auth_key).signature)
    assert tx_input(w3, settled.transaction) == channel.multicall_calldata(
        [
            channel.claim_with_signature_calldata([claim_row], claim_sig),
            channel.refund_with_signature_calldata(local, 2_000_000, 0, refund_sig),
        ]
    )
    # The client kept its channel, 2 USDC lighter.
    ctx = payer.storage.get(hexb(cid))
    assert ctx is not None and ctx.balance == str(DEPOSIT - 2_000_000) and ctx.charged_cumulative_amount == "1000000"

    # A full refund: everything unclaimed (7 USDC); nothing left to claim, so a plain refundWithSignature.
    response = payer.scheme.refund(URL, RefundOptions(fetch=server.refund_fetch(req, seen)))
    assert response.success and response.amount == "7000000"
    assert chain.balance(payer.address) == 20_000_000 - 1_000_000
    assert on_chain(w3, cid) == (1_000_000, 1_000_000)
    assert contract.functions.refundNonce(cid).call() == 2
    assert contract.functions.pendingWithdrawals(cid).call() == [0, 0]  # covered by the refund: cancelled
    refund_sig = bytes(Account.unsafe_sign_hash(channel.refund_digest(cid, 1, 7_000_000, CHAIN_ID), auth_key).signature)
    assert channel.decode_payload(seen[1][0].payload).refund_amount is None  # "everything"
    assert tx_input(w3, seen[1][1].transaction) == channel.refund_with_signature_calldata(
        local, 7_000_000, 1, refund_sig
    )
    assert payer.storage.get(hexb(cid)) is None and server.record(hexb(cid)) is None  # both forget the channel

    # 3. The refund signature cannot be replayed (its nonce is spent), nor forged, nor sent by a stranger.
    stranger = funded_key(w3)
    replay = tx_input(w3, seen[1][1].transaction)
    assert revert_selector(w3, Account.from_key(stranger).address, replay) == selector("InvalidRefundNonce(uint256)")
    forged = bytes(Account.unsafe_sign_hash(channel.refund_digest(cid, 2, 1, CHAIN_ID), Account.create().key).signature)
    assert revert_selector(
        w3, Account.from_key(stranger).address, channel.refund_with_signature_calldata(local, 1, 2, forged)
    ) == selector("InvalidAuthorizerSignature()")
    assert revert_selector(w3, Account.from_key(stranger).address, channel.refund_calldata(local, 1)) == selector(
        "Unauthorized()"
    )
    # The server still settles what it claimed.
    server.manager.settle()
    assert chain.balance(server.receiver) == 1_000_000


# -- 1 + 2: a Permit2 deposit from a wallet with no approval and no ETH (eip2612GasSponsoring) ---------


def test_sdk_permit2_deposit_with_an_eip2612_permit_from_a_bare_wallet(
    chain: Chain, devnet: Devnet, facilitator: x402FacilitatorSync, server: Server
) -> None:
    w3 = chain.w3
    bare = chain.fund(20_000_000)  # USDC only: no ETH, no Permit2 approval
    assert w3.eth.get_balance(bare.address) == 0
    assert chain.token.functions.allowance(bare.address, permit2.PERMIT2_ADDRESS).call() == 0
    # The client needs chain reads (the token's permit nonce, the allowance) to sign the EIP-2612 permit.
    payer = Payer(bare, devnet, signer=EthAccountSignerWithRPC(bare, devnet.rpc_url))
    req = server.requirements(devnet, "permit2")
    payment = payer.pay(req, extensions=declare_eip2612_gas_sponsoring_extension())
    info = payment.extensions["eip2612GasSponsoring"]["info"]
    assert info["spender"] == permit2.PERMIT2_ADDRESS and info["amount"] == str(DEPOSIT)
    response = server.serve(payment, req, 123_456)
    payer.receive(payment, response)
    p2612 = permit2.decode_eip2612_permit(payment.extensions)
    decoded = channel.decode_payload(payment.payload)
    assert p2612 is not None and decoded.deposit is not None
    assert tx_input(w3, response.transaction) == channel.deposit_calldata(decoded.config, decoded.deposit, p2612)
    cid = channel.channel_id(decoded.config, CHAIN_ID)
    assert on_chain(w3, cid) == (DEPOSIT, 0)
    assert chain.balance(bare.address) == 20_000_000 - DEPOSIT and w3.eth.get_balance(bare.address) == 0
    assert chain.token.functions.allowance(bare.address, permit2.PERMIT2_ADDRESS).call() == 0  # permit used up
    # Then vouchers, claimed and settled.
    payment, _ = payer.request(server, req, PRICE)
    assert payment.payload["type"] == "voucher"
    assert payment.payload["voucher"]["maxClaimableAmount"] == str(123_456 + PRICE)
    server.manager.claim_and_settle()
    assert chain.balance(server.receiver) == 123_456 + PRICE
    assert on_chain(w3, cid) == (DEPOSIT, 123_456 + PRICE)


# -- 3: hostile vouchers, claims and deposits ---------------------------------------------------------


def test_hostile_vouchers_claims_and_deposits_are_refused(
    chain: Chain, devnet: Devnet, facilitator: x402FacilitatorSync, server: Server
) -> None:
    w3, token = chain.w3, devnet.token
    req = server.requirements(devnet)
    payer = Payer(chain.fund(20_000_000), devnet)
    deposit_payment, _ = payer.request(server, req, PRICE)
    payer.request(server, req, PRICE)  # charged 2 USDC, signed up to 2 USDC
    config = payer.config(req)
    local = local_config(config)
    cid = channel.channel_id(local, CHAIN_ID)
    relayer_key = funded_key(w3)
    relayer = Account.from_key(relayer_key).address
    auth_key = server.authorizer.key
    fac_req = build_payment_requirements(server.receiver, token, NETWORK)

    def voucher(amount: int, account: Any = payer.account) -> Any:
        return sign_voucher(EthAccountSigner(account), hexb(cid), amount, NETWORK)

    def voucher_payment(fields: Any) -> PaymentPayload:
        payload = {"type": "voucher", "channelConfig": config.to_dict(), "voucher": fields.to_dict()}
        return PaymentPayload(payload=payload, accepted=req, resource=ResourceInfo(url=URL))

    def sig(fields: Any) -> bytes:
        return bytes.fromhex(fields.signature[2:])

    genuine = voucher(2 * PRICE)

    # A deposit authorization cannot be used twice, a collector cannot be swapped, a config must be sane.
    again = facilitator.settle(deposit_payment, req)
    assert not again.success and again.error_reason == ERR_DEPOSIT_SIMULATION_FAILED
    decoded = channel.decode_payload(deposit_payment.payload)
    assert decoded.deposit is not None
    data = channel.deposit_calldata(decoded.config, decoded.deposit)
    with pytest.raises(ContractLogicError, match="authorization is used"):
        w3.eth.call({"from": relayer, "to": channel.BATCH_SETTLEMENT_ADDRESS, "data": hexb(data)})
    swapped = data.replace(
        bytes.fromhex(channel.ERC3009_DEPOSIT_COLLECTOR_ADDRESS[2:].lower()), bytes.fromhex(relayer[2:].lower())
    )
    assert revert_selector(w3, relayer, swapped) == selector("UnknownCollector(address)")
    too_short = channel.ChannelConfig(**{**local.__dict__, "withdraw_delay": channel.MIN_WITHDRAW_DELAY - 1})
    assert revert_selector(w3, relayer, channel.deposit_calldata(too_short, decoded.deposit)) == selector(
        "InvalidChannelConfig()"
    )

    # A voucher signed by another key: refused by the SDK facilitator, reverted on chain.
    forged = voucher(3 * PRICE, Account.create())
    assert facilitator.verify(voucher_payment(forged), req).invalid_reason == ERR_INVALID_VOUCHER_SIGNATURE
    row = channel.Claim(local, 3 * PRICE, sig(forged), 2 * PRICE)
    assert revert_selector(w3, relayer, authorized_claim(w3, [row], auth_key)) == selector(
        "InvalidVoucherSignature(bytes32)"
    )
    bad = VoucherClaim(config, str(3 * PRICE), forged.signature, str(2 * PRICE))
    bad_sig = sign_claim_batch(LocalAuthorizerSigner(server.authorizer), [bad], NETWORK)
    refused = facilitator.settle(build_claim_payment_payload([bad], fac_req, bad_sig), fac_req)
    assert not refused.success and refused.error_reason == ERR_CLAIM_SIMULATION_FAILED

    # A voucher above the deposit: refused; a claim above the deposit reverts.
    big = voucher(DEPOSIT + 1)
    assert facilitator.verify(voucher_payment(big), req).invalid_reason == ERR_CUMULATIVE_EXCEEDS_BALANCE
    row = channel.Claim(local, DEPOSIT + 1, sig(big), DEPOSIT + 1)
    assert revert_selector(w3, relayer, authorized_claim(w3, [row], auth_key)) == selector(
        "ClaimExceedsBalance(bytes32)"
    )
    # A claim above its voucher reverts.
    row = channel.Claim(local, 2 * PRICE, sig(genuine), 2 * PRICE + 1)
    assert revert_selector(w3, relayer, authorized_claim(w3, [row], auth_key)) == selector(
        "ClaimExceedsVoucher(bytes32)"
    )

    # A claim not authorized by the receiver authorizer: another key (the payer's too), a stranger's
    # direct claim, a batch mixing channels of different authorizers; and through the SDK facilitator.
    row = channel.Claim(local, 2 * PRICE, sig(genuine), 2 * PRICE)
    for key in (Account.create().key, payer.account.key):
        assert revert_selector(w3, relayer, authorized_claim(w3, [row], key)) == selector(
            "InvalidAuthorizerSignature()"
        )
    assert revert_selector(w3, relayer, channel.claim_calldata([row])) == selector("Unauthorized()")
    assert revert_selector(w3, payer.address, channel.claim_calldata([row])) == selector("Unauthorized()")
    elsewhere = channel.ChannelConfig(**{**local.__dict__, "receiver_authorizer": relayer.lower()})
    mixed = [row, channel.Claim(elsewhere, 1, sig(genuine), 0)]
    assert revert_selector(w3, relayer, authorized_claim(w3, mixed, auth_key)) == selector("MixedReceiverAuthorizers()")
    good = VoucherClaim(config, str(2 * PRICE), genuine.signature, str(2 * PRICE))
    stranger_sig = sign_claim_batch(LocalAuthorizerSigner(Account.create()), [good], NETWORK)
    refused = facilitator.settle(build_claim_payment_payload([good], fac_req, stranger_sig), fac_req)
    assert not refused.success and refused.error_reason == ERR_CLAIM_SIMULATION_FAILED
    assert on_chain(w3, cid) == (DEPOSIT, 0) and receiver_totals(w3, server.receiver, token) == (0, 0)

    # The receiver itself may claim directly (no authorizer signature needed).
    w3.provider.make_request("anvil_setBalance", [server.receiver, hex(10**18)])
    assert send(w3, server.receiver_key, channel.claim_calldata([row]))["status"] == 1
    assert on_chain(w3, cid) == (DEPOSIT, 2 * PRICE)

    # Backwards: a voucher not above what is claimed is refused; a lower claim moves nothing.
    for amount in (2 * PRICE, PRICE):
        assert facilitator.verify(voucher_payment(voucher(amount)), req).invalid_reason == (
            ERR_CUMULATIVE_AMOUNT_BELOW_CLAIMED
        )
    lower = channel.Claim(local, 2 * PRICE, sig(genuine), PRICE)
    # Nothing twice: the same claim again, or a lower one, moves nothing.
    for rows in ([lower], [row], [row, row]):
        assert send(w3, relayer_key, authorized_claim(w3, rows, auth_key))["status"] == 1
        assert on_chain(w3, cid) == (DEPOSIT, 2 * PRICE)
        assert receiver_totals(w3, server.receiver, token) == (2 * PRICE, 0)

    # In the end the payer paid the deposit once, and the receiver gets exactly what was claimed.
    assert chain.balance(payer.address) == 20_000_000 - DEPOSIT
    server.manager.settle()
    assert chain.balance(server.receiver) == 2 * PRICE


# -- 4: the timed withdrawal, on an anvil of this test's own (its clock moves) ------------------------


def test_timed_withdrawal_returns_the_unclaimed_rest() -> None:
    port = free_port()
    proc = start_anvil(port)
    try:
        own = deploy_devnet(f"http://127.0.0.1:{port}")
        chain = Chain(own)
        w3 = chain.w3
        fac = sdk_facilitator(own.rpc_url, funded_key(w3))
        server = Server.create(own, fac)
        req = server.requirements(own)
        payer = Payer(chain.fund(20_000_000, eth=True), own)
        payer.request(server, req, PRICE)
        payer.request(server, req, PRICE)  # charged 2 USDC
        local = local_config(payer.config(req))
        cid = channel.channel_id(local, CHAIN_ID)
        config = as_tuple(local)
        stranger_key = funded_key(w3)
        stranger = Account.from_key(stranger_key).address

        # Only the payer (or its payer authorizer) withdraws, at most the unclaimed balance, once at a time.
        initiate = encode(w3, "initiateWithdraw", config, DEPOSIT)
        finalize = encode(w3, "finalizeWithdraw", config)
        assert revert_selector(w3, stranger, initiate) == selector("Unauthorized()")
        assert revert_selector(w3, payer.address, encode(w3, "initiateWithdraw", config, DEPOSIT + 1)) == selector(
            "WithdrawExceedsAvailable(uint128)"
        )
        assert revert_selector(w3, payer.address, finalize) == selector("NoPendingWithdrawal()")
        receipt = send(w3, payer.key, initiate)
        assert receipt["status"] == 1
        started = w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        assert escrow(w3).functions.pendingWithdrawals(cid).call() == [DEPOSIT, started]
        assert revert_selector(w3, payer.address, initiate) == selector("WithdrawalPending()")

        # The facilitator reports the pending withdrawal to the server with the next request...
        payment, response = payer.request(server, req, 500_000)  # charged 2.5 USDC, signed up to 3
        assert payment.payload["type"] == "voucher" and response.extra["channelState"]["withdrawRequestedAt"] == started
        # ... which claims what it is owed before the delay ends: that works.
        assert revert_selector(w3, payer.address, finalize) == selector("WithdrawDelayNotElapsed(uint256)")
        server.manager.claim()
        assert on_chain(w3, cid) == (DEPOSIT, 2_500_000)

        w3.provider.make_request("evm_increaseTime", [DELAY])
        w3.provider.make_request("evm_mine", [])
        assert revert_selector(w3, stranger, finalize) == selector("Unauthorized()")
        before = chain.balance(payer.address)
        assert send(w3, payer.key, finalize)["status"] == 1
        # The unclaimed rest went back to the payer; the withdrawal is over; the claimed part stays.
        assert chain.balance(payer.address) == before + DEPOSIT - 2_500_000
        assert on_chain(w3, cid) == (2_500_000, 2_500_000)
        assert escrow(w3).functions.pendingWithdrawals(cid).call() == [0, 0]
        # What was signed but not claimed in time can no longer be claimed.
        record = server.record(hexb(cid))
        assert record is not None and record.signed_max_claimable == "3000000"
        late = channel.Claim(local, 3_000_000, bytes.fromhex(record.signature[2:]), 3_000_000)
        assert revert_selector(w3, stranger, authorized_claim(w3, [late], server.authorizer.key)) == selector(
            "ClaimExceedsBalance(bytes32)"
        )
        # The receiver gets what it claimed; the escrow is empty.
        server.manager.settle()
        assert chain.balance(server.receiver) == 2_500_000
        assert chain.balance(channel.BATCH_SETTLEMENT_ADDRESS) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)

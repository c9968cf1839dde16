"""MPP's evm charge paid with a ``permit2`` credential: the payer signs a Permit2
``PermitWitnessTransferFrom`` of the challenge's amount to the payee, naming our settlement account
as the spender and binding the challenge in the witness ``PaymentWitness(challengeHash,
externalId)``; the settlement account calls ``Permit2.permitWitnessTransferFrom`` itself.

A payment of the quote like ``exact`` (what the call does not cost becomes credit), checked like
``upto``: locally (spender, recipient, token, amount, deadline, signature), then — once its Permit2
nonce is locked (the nonce space ``upto`` uses too) — by simulating the transfer and reading the
payer's balance and Permit2 allowance. Carried by the MPP rail only (draft-evm-charge's
"Permit2 Payload"); the rail checks the witness's challenge hash.

The draft writes the witness type with a space after the comma (``PaymentWitness(bytes32
challengeHash, string externalId)``), which EIP-712 tooling would not produce; a signature over
either spelling is accepted, and the settlement names Permit2 the one that was signed.
"""

from __future__ import annotations

from typing import Any

from ..errors import PaymentInvalid, PaymentMalformed
from ..keccak import keccak
from . import permit2
from .base import Offer, Proof, Quote, Verified
from .eip3009 import UINT256_MAX
from .permit2 import PERMIT2_ADDRESS, TOKEN_PERMISSIONS_TYPEHASH, SignatureError, recover
from .upto import UptoEvm

WITNESS_TYPES = (
    "PaymentWitness(bytes32 challengeHash,string externalId)",  # as EIP-712 encodes it
    "PaymentWitness(bytes32 challengeHash, string externalId)",  # as the draft spells it
)
STUB = b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
SELECTOR = keccak(
    b"permitWitnessTransferFrom(((address,uint256),uint256,uint256),(address,uint256),address,bytes32,string,bytes)"
)[:4]


def type_string(witness_type: str) -> str:
    """What follows Permit2's ``…uint256 deadline,`` stub: the witness and the types it references."""
    return f"PaymentWitness witness){witness_type}TokenPermissions(address token,uint256 amount)"


def witness_hash(challenge_hash: bytes, external_id: str, witness_type: str) -> bytes:
    return keccak(keccak(witness_type.encode()) + challenge_hash + keccak(external_id.encode()))


def digest(c: dict[str, Any], spender: str, witness_type: str, chain_id: int) -> bytes:
    """The digest a ``permit2`` credential's payer signs (``c``: its decoded fields)."""
    permitted = keccak(TOKEN_PERMISSIONS_TYPEHASH + _address(c["token"]) + _uint(c["amount"]))
    struct = keccak(
        keccak(STUB + type_string(witness_type).encode())
        + permitted
        + _address(spender)
        + _uint(c["nonce"])
        + _uint(c["deadline"])
        + witness_hash(c["challenge_hash"], c["external_id"], witness_type)
    )
    return keccak(b"\x19\x01" + permit2.domain_separator(c["chain_id"]) + struct)


def calldata(c: dict[str, Any], owner: str, witness_type: str) -> bytes:
    """``Permit2.permitWitnessTransferFrom(permit, transferDetails, owner, witness, witnessTypeString, signature)``."""
    type_bytes = type_string(witness_type).encode()
    head = (
        _address(c["token"])
        + _uint(c["amount"])
        + _uint(c["nonce"])
        + _uint(c["deadline"])
        + _address(c["to"])
        + _uint(c["amount"])
        + _address(owner)
        + witness_hash(c["challenge_hash"], c["external_id"], witness_type)
    )
    string_tail = _tail(type_bytes)
    offsets = _uint(len(head) + 64) + _uint(len(head) + 64 + len(string_tail))
    return SELECTOR + head + offsets + string_tail + _tail(c["signature"])


def decode(payload: Any, chain_id: int) -> dict[str, Any]:
    """A ``permit2`` credential's payload → its fields; ``PaymentMalformed`` for any other shape.
    Splits (more than one transfer) are refused: tollway pays one payee."""
    try:
        permit, details, witness = payload["permit"], payload["transferDetails"], payload["witness"]
        (permitted,), (detail,) = permit["permitted"], details
        out = {
            "token": _hex_address(permitted["token"]),
            "amount": _decimal(permitted["amount"]),
            "requested": _decimal(detail["requestedAmount"]),
            "to": _hex_address(detail["to"]),
            "nonce": _decimal(permit["nonce"]),
            "deadline": _decimal(permit["deadline"]),
            "challenge_hash": bytes.fromhex(str(witness["challengeHash"]).removeprefix("0x")),
            "external_id": str(witness.get("externalId") or "").encode().decode(),  # (hashable: no lone surrogate)
            "signature": bytes.fromhex(str(payload["signature"]).removeprefix("0x")),
            "chain_id": chain_id,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PaymentMalformed(
            "a permit2 credential needs permit {permitted: [one {token, amount}], nonce, deadline}, "
            "transferDetails: [one {to, requestedAmount}], witness {challengeHash}, signature",
            code="invalid_payload",
        ) from exc
    if len(out["challenge_hash"]) != 32:
        raise PaymentMalformed("witness.challengeHash is not 32 bytes", code="invalid_payload")
    return out


class Permit2Charge(UptoEvm):
    """MPP charge by Permit2 for one token on one EVM chain: the settlement account is the spender."""

    name = "mpp-permit2"
    rails = ("mpp",)
    metered = False  # a payment of the quote, like exact

    def extensions(self) -> dict[str, Any]:
        return {}

    async def verify(self, proof: Proof, offer: Offer, quote: Quote, now: int) -> Verified:
        c = decode(proof.payload, self.chain_id)
        checks = (
            (c["token"] == self.token.lower(), "the permit is for another token", "permit2_token_mismatch"),
            (c["to"] == self.payee.lower(), "the transfer pays someone else", "invalid_permit2_recipient_mismatch"),
            (
                c["amount"] == c["requested"] == offer.amount,
                f"the permit must transfer exactly the challenge's amount {offer.amount}",
                "permit2_amount_mismatch",
            ),
            (
                c["deadline"] >= now + self.min_validity,
                f"the permit must stay valid at least {self.min_validity} s: the call and its settlement must fit",
                "permit2_deadline_expired",
            ),
        )
        for ok, message, code in checks:
            if not ok:
                raise PaymentInvalid(message, code=code)
        for witness_type in WITNESS_TYPES:
            try:
                owner = recover(digest(c, self.settler, witness_type, self.chain_id), c["signature"])
            except SignatureError as exc:
                raise PaymentInvalid(f"bad signature: {exc}", code="invalid_permit2_signature") from exc
            if proof.extensions is None or owner == str(proof.extensions.get("source", owner)).lower():
                break
        else:
            raise PaymentInvalid("the permit is not signed by its source", code="invalid_permit2_signature")
        return Verified(
            scheme=self.name,
            network=self.network,
            asset=self.token.lower(),
            payer=owner,
            payee=self.payee.lower(),
            amount=c["amount"],
            lock_key=f"{self.network}:permit2:{owner}:{c['nonce']}",
            proof={"payload": proof.payload, "owner": owner, "witnessType": witness_type},
        )

    def settled_amount(self, payment: Verified, due: int) -> int:
        return payment.amount

    def _settle(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes]:
        c = decode(proof["payload"], self.chain_id)
        return PERMIT2_ADDRESS, calldata(c, proof["owner"], proof["witnessType"])

    def settlement_call(self, proof: dict[str, Any], amount: int) -> tuple[str, bytes]:
        return self._settle(proof, amount)


def _address(a: str) -> bytes:
    return bytes(12) + bytes.fromhex(a[2:])


def _uint(v: int) -> bytes:
    return v.to_bytes(32, "big")


def _tail(data: bytes) -> bytes:
    return _uint(len(data)) + data + bytes(-len(data) % 32)


def _hex_address(v: Any) -> str:
    if not (isinstance(v, str) and len(v) == 42 and v.startswith("0x")):
        raise ValueError("not an address")
    int(v, 16)
    return v.lower()


def _decimal(v: Any) -> int:
    if not (isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 78 and int(v) <= UINT256_MAX):
        raise ValueError("not a uint256 decimal string")
    return int(v)


from_settings = Permit2Charge.from_settings

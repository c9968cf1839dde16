"""The payer's side of x402 ``batch-settlement``: its channel with a gateway — what it holds and what
it has been charged, as the gateway's answers tell — and the payloads that pay on it: a deposit (an
ERC-3009 authorization to the escrow's collector) with the first voucher, then a cumulative voucher
per call, and the refund of what was not charged.

A corrective 402 (the gateway counted another charged total: a stream, charged as it ended, or a
client that restarted) is believed only as far as the payer signed: its last voucher must be the
payer's own and cover the total the gateway states, so a gateway can never make the payer sign
for more than it already agreed to pay.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount

from ..payments import channel as ch
from ..payments.eip3009 import SignatureError

MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"


@dataclass
class Channel:
    """One channel of a payer with one gateway: its immutable config and the running totals."""

    config: dict[str, Any]  # channelConfig, as the payloads carry it
    id: str  # 0x channel id
    chain_id: int
    balance: int = 0  # deposited
    charged: int = 0  # charged by the gateway, cumulative
    signed: int = 0  # the highest voucher signed: what the gateway can claim

    @classmethod
    def of(cls, account: LocalAccount, offer: dict[str, Any], salt: bytes = bytes(32)) -> Channel:
        """The channel ``account`` pays ``offer``'s gateway through (one per salt)."""
        extra = offer.get("extra") or {}
        config = {
            "payer": account.address,
            "payerAuthorizer": account.address,
            "receiver": offer["payTo"],
            "receiverAuthorizer": extra["receiverAuthorizer"],
            "token": offer["asset"],
            "withdrawDelay": int(extra["withdrawDelay"]),
            "salt": "0x" + salt.hex(),
        }
        chain_id = int(str(offer["network"]).split(":", 1)[1])
        cid = ch.channel_id(ch.decode_config(config), chain_id)
        return cls(config, "0x" + cid.hex(), chain_id)

    def needs(self, amount: int) -> int:
        """What must be deposited before a voucher for ``amount`` more can be taken."""
        return max(self.charged + amount - self.balance, 0)

    def voucher(self, account: LocalAccount, total: int) -> dict[str, Any]:
        digest = ch.voucher_digest(bytes.fromhex(self.id[2:]), total, self.chain_id)
        return {"channelId": self.id, "maxClaimableAmount": str(total), "signature": _sign(account, digest)}

    def payload(self, account: LocalAccount, offer: dict[str, Any], deposit: int = 0) -> dict[str, Any]:
        """The x402 payload paying ``offer``'s amount on this channel, with a deposit if asked."""
        out = {
            "type": "deposit" if deposit else "voucher",
            "channelConfig": self.config,
            "voucher": self.voucher(account, self.charged + int(offer["amount"])),
        }
        self.signed = max(self.signed, self.charged + int(offer["amount"]))
        if deposit:
            extra = offer.get("extra") or {}
            salt = secrets.randbits(256)
            valid_before = int(time.time()) + int(offer.get("maxTimeoutSeconds") or 300)
            auth = ch.Erc3009Deposit(valid_after=0, valid_before=valid_before, salt=salt, signature=b"")
            digest = ch.erc3009_deposit_digest(
                ch.decode_config(self.config),
                ch.Deposit(deposit, auth),
                self.chain_id,
                str(extra.get("name", "USD Coin")),
                str(extra.get("version", "2")),
            )
            out["deposit"] = {
                "amount": str(deposit),
                "authorization": {
                    "erc3009Authorization": {
                        "validAfter": "0",
                        "validBefore": str(valid_before),
                        "salt": "0x" + salt.to_bytes(32, "big").hex(),
                        "signature": _sign(account, digest),
                    }
                },
            }
        return out

    def refund_payload(self, account: LocalAccount, amount: int | None = None) -> dict[str, Any]:
        """Ask for the channel's unclaimed rest (or ``amount`` of it) back: a voucher at the charged total."""
        out = {"type": "refund", "channelConfig": self.config, "voucher": self.voucher(account, self.charged)}
        if amount is not None:
            out["amount"] = str(amount)
        return out

    def charged_by(self, extra: dict[str, Any] | None, deposit: int, amount: int) -> None:
        """A paid answer's ``PAYMENT-RESPONSE.extra``: add what this call was charged (and deposited)
        — believed up to the ``amount`` its voucher added, no further (the next voucher signs for
        what is counted here)."""
        self.balance += deposit
        charged = str((extra or {}).get("chargedAmount", "0"))
        if digits(charged):
            self.charged = min(self.charged + min(int(charged), amount), self.signed)

    def corrected(self, account: LocalAccount, extra: dict[str, Any]) -> tuple[int, int, int] | None:
        """The totals (charged, balance, highest signed) a corrective 402's offer ``extra`` states —
        if its last voucher is this payer's and covers the charged total it states; else None."""
        state, voucher = extra.get("channelState"), extra.get("voucherState")
        if not isinstance(state, dict) or not isinstance(voucher, dict) or state.get("channelId") != self.id:
            return None
        try:
            charged, signed = int(state["chargedCumulativeAmount"]), int(voucher["signedMaxClaimable"])
            balance = int(state.get("balance", self.balance))
            sig = bytes.fromhex(str(voucher["signature"]).removeprefix("0x"))
            mine = ch.voucher_signer(ch.Voucher(bytes.fromhex(self.id[2:]), signed, sig), self.chain_id)
        except (KeyError, TypeError, ValueError, SignatureError):
            return None
        if mine != account.address.lower() or not 0 <= charged <= signed or balance < 0:
            return None
        return charged, balance, max(self.signed, signed)  # (signed before: by this payer, perhaps in another session)

    def resync(self, account: LocalAccount, extra: dict[str, Any]) -> bool:
        """Adopt the totals of a corrective 402's offer ``extra`` (``corrected``). Whether it did."""
        totals = self.corrected(account, extra)
        if totals is not None:
            self.charged, self.balance, self.signed = totals
        return totals is not None

    def adds(self, account: LocalAccount, offer: dict[str, Any]) -> int:
        """What a voucher paying ``offer`` signs beyond the highest one signed before it (after the
        correction its 402 may carry): all the gateway can claim that it could not already."""
        totals = self.corrected(account, offer.get("extra") or {})
        charged, _, signed = totals if totals is not None else (self.charged, self.balance, self.signed)
        return max(charged + int(offer["amount"]) - signed, 0)


def digits(text: str) -> bool:
    """An amount a server states: a non-negative integer in ASCII digits (``str.isdigit`` alone takes
    "²") that fits in 256 bits' 78 digits (``int`` refuses more than 4,300)."""
    return text.isascii() and text.isdigit() and len(text) <= 78


def _sign(account: LocalAccount, digest: bytes) -> str:
    return "0x" + bytes(account.unsafe_sign_hash(digest).signature).hex().removeprefix("0x")

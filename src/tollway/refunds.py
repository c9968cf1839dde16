"""``/v1/channels/refund``: a batch-settlement payer takes back what its channel holds and was not
charged, at once — the SDK's cooperative refund (``BatchSettlementEvmScheme.refund(url)``).

Asked without payment, it answers 402 with the batch-settlement offer (the channel's terms). Asked
with a ``refund`` payload — the payer's voucher at exactly what the channel has been charged, and
optionally an amount — it takes the channel (no call may run on it meanwhile), claims the charges
not claimed yet and refunds the rest (or the amount asked) in one transaction of ours,
``multicall([claimWithSignature…, refundWithSignature…, settle…])``, and answers once it is mined,
with the transaction in ``PAYMENT-RESPONSE``. A voucher at another total gets the corrective 402.
"""

from __future__ import annotations

from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import signin
from .challenge import least_withdrawal
from .claims import escrowed
from .errors import NotFound, PaymentInvalid, PaymentRequired
from .gateway import Gateway
from .keccak import keccak
from .ledger.channels import REFUND_HOLD, ChannelRefused
from .ledger.models import TxState
from .ledger.store import new_id
from .payments import channel as ch
from .payments import x402
from .payments.batch import PREFIX, BatchSettlementEvm, state
from .settlement import Signing

REFUND_NONCE = keccak(b"refundNonce(bytes32)")[:4]


async def status(request: Request, gw: Gateway) -> Response:
    """``GET /v1/channels/{channel_id}``: a channel as the gateway counts it, for its payer (signed in)."""
    who = await signin.require(gw, request, signin.request_key(request))
    channel = gw.store.channel(request.path_params["channel_id"].lower())
    if channel is None or channel["payer"] != who.wallet:
        raise NotFound("no channel of this wallet by that id")
    unclaimed = channel["charged"] - channel["claimed"]
    return JSONResponse(
        {**state(channel, channel["charged"]), "unclaimed": str(unclaimed), "refunded": str(channel["refunded"])}
    )


async def refund(request: Request, gw: Gateway) -> Response:
    scheme = next((s for s in gw.schemes if isinstance(s, BatchSettlementEvm)), None)
    if scheme is None:
        raise NotFound("this gateway takes no batch-settlement channels")
    try:
        return await _refund(request, gw, scheme)
    except PaymentRequired as exc:
        offer = scheme.offer(0)
        more = exc.offer_extra.get(scheme.name, {})  # (the corrective 402's channel state)
        offer = replace(offer, extra={**offer.extra, **more})
        error = exc.code  # (the SDK's refund compares it whole: which refusals are final)
        resource = {"url": gw.public_base(request) + request.url.path, "description": "channel refund"}
        doc = x402.payment_required(error, resource, [offer])
        exc.challenge = {"headers": {x402.PAYMENT_REQUIRED: x402.b64json(doc)}, "body": exc.body()}
        raise


async def _refund(request: Request, gw: Gateway, scheme: BatchSettlementEvm) -> Response:
    proof = x402.decode_proof(request.headers, {})
    if proof is None or proof.version != 2:
        raise PaymentRequired("send a refund payload (x402 v2 PAYMENT-SIGNATURE) for your channel")
    p = ch.decode_payload(proof.payload)
    if p.type != "refund":
        raise PaymentInvalid("this endpoint takes refund payloads only", code=PREFIX + "payload_type")
    cid = scheme.check_channel(p)
    channel_id = "0x" + cid.hex()
    holder = new_id()
    try:
        taken = gw.store.take_for_refund(
            channel_id, p.voucher.max_claimable, holder, p.config.payer, gw.settings.min_validity_seconds
        )
    except ChannelRefused as refused:
        raise scheme.channel_refused(refused) from None
    sending = False  # once the refund is sent, the channel stays taken even if we stop waiting for it
    try:
        # A deposit its call stopped waiting for is counted as it is mined (the worker's): a refund's
        # escrow read taken before that would count it too. (None can start while the refund holds it.)
        if any(ch.deposit_of(bytes.fromhex(d[2:]), scheme.chain_id)[0] == channel_id for d in gw.store.open_deposits()):
            raise PaymentInvalid(
                "a deposit into this channel is not mined yet: ask for the refund once it is",
                code=PREFIX + "channel_busy",
            )
        held, _ = await escrowed(gw.chain, cid)  # (the escrow's word: a deposit may be mined that we did not count)
        remainder = held - taken["charged"]
        amount = remainder if p.refund_amount is None else p.refund_amount
        if remainder <= 0 or amount > remainder:
            raise PaymentInvalid(
                f"the channel has {max(remainder, 0)} left to refund", code=PREFIX + "refund_no_balance"
            )
        least = least_withdrawal(gw)
        if amount < min(least, remainder):  # (the gateway pays each refund's gas)
            raise PaymentInvalid(
                f"a refund of part of the channel is at least {least} units (the whole {remainder} may always be)",
                code=PREFIX + "refund_too_small",
            )
        nonce = int.from_bytes(await gw.chain.call(ch.BATCH_SETTLEMENT_ADDRESS, REFUND_NONCE + cid), "big")
        calls = []
        if taken["charged"] > taken["claimed"]:  # the charges go to the payee first
            claims = [ch.Claim(p.config, p.voucher.max_claimable, p.voucher.signature, taken["charged"])]
            signature = scheme.sign(ch.claim_batch_digest(claims, scheme.chain_id))
            calls += [
                ch.claim_with_signature_calldata(claims, signature),
                ch.settle_calldata(scheme.payee, scheme.token),
            ]
        signature = scheme.sign(ch.refund_digest(cid, nonce, amount, scheme.chain_id))
        calls.append(ch.refund_with_signature_calldata(p.config, amount, nonce, signature))
        signing = Signing(gw.settler, ch.BATCH_SETTLEMENT_ADDRESS, ch.multicall_calldata(calls))
        tx = gw.store.queue_refund(channel_id, holder, gw.settler.address, signing)  # (held until concluded)
        if tx is None:
            raise PaymentInvalid(
                "the channel was taken meanwhile: ask for the refund again", code=PREFIX + "channel_busy"
            )
        sending = True  # the hold is the refund's now: the request or the claimer concludes it
        tx = await gw.settler.concluded(tx, timeout=gw.settings.settle_margin_seconds)  # (or what replaced it)
        mined = str(tx["mined_hash"]) if tx["state"] == TxState.MINED else None
        balance, claimed = await escrowed(gw.chain, cid, mined)  # (as of the refund's block, if mined)
        hold = REFUND_HOLD + tx["id"]
        after = gw.store.refunded(channel_id, hold, balance=balance, claimed=claimed, mined=mined is not None)
        if mined is None:
            raise PaymentInvalid("the refund reverted on chain", code=PREFIX + "refund_transaction_failed")
        after = after or gw.store.channel(channel_id)  # (the claimer concluded it first)
        refunded = max(held - balance, 0)
    except BaseException:
        if not sending:
            gw.store.free_channel(channel_id, holder)
        raise
    extra = {"channelState": state(after, after["charged"])}
    response = x402.settle_response(
        success=True, tx_hash=mined, network=scheme.network, payer=p.config.payer, amount=refunded, extra=extra
    )
    body = {"message": "Refund acknowledged", "channelId": channel_id, "amount": str(refunded)}
    return JSONResponse(body, headers={x402.PAYMENT_RESPONSE: response})

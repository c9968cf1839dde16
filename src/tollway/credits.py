"""Credit endpoints: a wallet's balance with the gateway, and withdrawals of it on chain.

All need the wallet signed in (``signin.py``: a 401 carries the sign-in to sign); the operator
may read a withdrawal. A withdrawal goes to the signed-in wallet only, and its sign-in is its
unique key (it works once). It debits credit and queues a payout atomically, once the wallet's
latest settlement is final (``chain.confirmations`` deep); the settlement worker pays it,
coalescing a wallet's pending withdrawals into one transfer.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import signin
from .challenge import credit_of, least_withdrawal
from .errors import BadRequest, Conflict, Forbidden, NotConfigured, NotFound, PaymentInvalid
from .gateway import Gateway
from .jsonbytes import dumps, loads
from .ledger.store import InsufficientCredit, NotFinal, credit_account
from .payments import signed
from .pipeline import read_body
from .pricing import MAX_AMOUNT, money

BLOCK_SECONDS = 2  # the shortest block time of the chains tollway knows (Base): what Retry-After counts a block as
WITHDRAWAL_BODY = "body must be JSON {amount} (signed in), or {withdrawal, signature}"


async def balance(request: Request, gw: Gateway) -> Response:
    who = await signin.require(gw, request, signin.request_key(request))
    account = credit_account(gw.network, gw.token, who.wallet)
    journal = await gw.report(partial(gw.store.journal, account))  # (a scan of the wallet's journal: off the loop)
    return JSONResponse(
        {
            "wallet": who.wallet,
            "network": gw.network,
            "asset": gw.token,
            "balance": money(gw.store.credit_balance(account), gw.settings.chain.decimals),
            "available": money(credit_of(gw, who), gw.settings.chain.decimals),  # what payments final on chain back
            "journal": {k: str(v) for k, v in journal.items()},
        }
    )


async def withdraw(request: Request, gw: Gateway) -> Response:
    try:
        doc = loads(await read_body(request, 16384))
        dumps(doc)  # (its digest is what a sign-in binds: JSON that UTF-8 cannot carry has none)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(
            "body must be JSON {amount} (signed in), or {withdrawal, signature}", code="invalid_json"
        ) from exc
    if not isinstance(doc, dict):
        raise BadRequest(
            "body must be JSON {amount} (signed in), or {withdrawal, signature}", code="invalid_withdrawal"
        )
    if "withdrawal" in doc:
        wallet, raw_amount, key = signed_withdrawal(request, gw, doc)
    else:
        who = await signin.require(gw, request, signin.request_key(request, doc))
        if who.legacy:
            raise signin.unauthorized(
                gw,
                request,
                signin.request_key(request, doc),
                "a withdrawal needs a sign-in (SIGN-IN-WITH-X)",
                "sign_in_required",
            )
        wallet, raw_amount, key = who.wallet, doc.get("amount"), f"sign-in:{who.nonce}"
    digits = str(raw_amount)
    if (
        not isinstance(raw_amount, (str, int))
        or isinstance(raw_amount, bool)
        or not (len(digits) <= 19 and digits.isascii() and digits.isdigit())
    ):
        raise BadRequest("amount must be a whole number of atomic units", code="invalid_amount")
    amount = int(raw_amount)
    if amount <= 0 or amount > MAX_AMOUNT:
        raise BadRequest(f"amount must be between 1 and {MAX_AMOUNT}", code="invalid_amount")
    least = least_withdrawal(gw)
    if amount < least:
        raise BadRequest(
            f"withdrawals start at {least} units (a payout's gas is paid by the gateway)", code="withdrawal_too_small"
        )
    if gw.settler.payout_account is None:
        raise NotConfigured("withdrawals are not configured here (chain.payout_key)", code="withdrawals_disabled")
    account = credit_account(gw.network, gw.token, wallet)
    head = await gw.chain.head()  # (503 while the chain does not answer: a payout needs it anyway)
    try:
        payout_id = gw.store.request_payout(account, wallet, amount, f"{account}|{key}", head=head)
    except InsufficientCredit:
        raise BadRequest(
            f"final credit {gw.store.available_credit(account)} is less than {amount}", code="insufficient_credit"
        ) from None
    except NotFinal as exc:
        raise Conflict(
            f"credit was deposited by a settlement that is final on chain at block {exc.block} (the chain is at"
            f" {head}): it cannot be withdrawn before",
            code="credit_not_final",
            retry_after=BLOCK_SECONDS * (exc.block - head),  # (a guess: a retry too early costs a 409)
        ) from None
    if payout_id is None:
        raise BadRequest("this withdrawal request was already made", code="withdrawal_replayed")
    gw.settler.request_payout()
    return JSONResponse(payout_view(gw, gw.store.payout(payout_id)), status_code=202)


def signed_withdrawal(request: Request, gw: Gateway, doc: dict[str, Any]) -> tuple[str, Any, str]:
    """tollway's earlier EIP-712 ``Withdrawal`` (deprecated, for one release): the wallet that
    signed it, the amount, and its unique key."""
    w = doc["withdrawal"]
    if not isinstance(w, dict):
        raise BadRequest("withdrawal must be an object", code="invalid_withdrawal")
    try:
        wallet = signed.signer("Withdrawal", gw.chain_id, gw.token, w, doc.get("signature"), gw.origin(request))
    except PaymentInvalid as exc:
        raise Forbidden(exc.message, code=exc.code) from None
    if str(w["wallet"]).lower() != wallet:
        raise Forbidden("withdrawal not signed by its wallet", code="invalid_withdrawal_signature")
    if int(w["validBefore"]) < time.time():
        raise BadRequest("withdrawal request has expired", code="withdrawal_expired")
    return wallet, w["amount"], str(w["nonce"]).lower()


def payout_view(gw: Gateway, row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        raise NotFound("no such withdrawal", code="withdrawal_not_found")
    return {
        "id": row["id"],
        "wallet": row["wallet"],
        "amount": money(row["amount"], gw.settings.chain.decimals),
        "state": row["state"],
        "transaction": row["tx_hash"],
        "error": row["error"],
    }


async def withdrawal(request: Request, gw: Gateway, *, operator: bool) -> Response:
    """A withdrawal, for its wallet (signed in) or the operator, as a receipt is."""
    row = gw.store.payout(request.path_params["payout_id"][:64])
    if not operator:
        await signin.require_owner(gw, request, None if row is None else row["wallet"], "withdrawal")
    return JSONResponse(payout_view(gw, row))

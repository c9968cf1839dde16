"""Metered cost, surplus credit, paying from credit, withdrawals — and the ledger's sums."""

from __future__ import annotations

import random
import time
from contextlib import AbstractContextManager
from fractions import Fraction

import httpx
import pytest

from support import ADMIN, CALLS, CHAT, PAYMENTS, chat_body, error_code, payment_required, wait_receipt
from support import credit as read_credit
from support import receipt as read_receipt
from tollway.client import AllowedAsset, Payer, SyncPayingTransport
from tollway.payments.x402 import unb64json
from tollway.pricing import to_atomic
from tollway.usage import Usage


@pytest.fixture
def payer(chain, devnet) -> Payer:
    """A payer of ``exact`` (which pays the quote: the surplus becomes credit)."""
    return Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))


def client(gateway, payer) -> httpx.Client:
    return httpx.Client(transport=SyncPayingTransport(payer), base_url=gateway.url, timeout=30)


def chat(http: httpx.Client, text: str, max_tokens: int, **extra) -> httpx.Response:
    return http.post(CHAT, json=chat_body(text, max_tokens=max_tokens, **extra))


def chat_stream(http: httpx.Client, text: str, max_tokens: int, **extra) -> AbstractContextManager[httpx.Response]:
    return http.stream("POST", CHAT, json=chat_body(text, max_tokens=max_tokens, stream=True, **extra))


def credit(gateway, payer, figure: str = "balance") -> int:
    return read_credit(gateway.url, payer, figure)


def withdrawal(url: str, payer, payout_id: str) -> dict:
    """A withdrawal as its wallet reads it, signed in."""
    with httpx.Client(transport=SyncPayingTransport(payer), timeout=30) as http:
        r = http.get(f"{url}/v1/credit/withdrawals/{payout_id}")
    assert r.status_code == 200, r.text
    return r.json()


def expected_cost(gateway, model: str, receipt: dict) -> int:
    conf = gateway.settings.models[model]
    u = receipt["usage"]
    cached = u["cached_tokens"] or 0
    written = u["cache_write_tokens"] or 0
    plain = u["prompt_tokens"] - cached - written
    usd = (
        Fraction(conf.request)
        + plain * Fraction(conf.prompt)
        + cached * Fraction(conf.cache_read)
        + written * Fraction(conf.cache_write)
        + u["completion_tokens"] * Fraction(conf.completion)
    )
    return to_atomic(usd, gateway.settings.chain.decimals)


def test_surplus_becomes_credit_and_cheapens_the_next_call(gateway, chain, devnet, payer):
    start = chain.balance(payer.account.address)
    with client(gateway, payer) as http:
        first = chat(http, "first call", 200)
        assert first.status_code == 200
        r1 = wait_receipt(gateway.url, first.headers["x-tollway-receipt"])
        cost1 = int(r1["cost"]["atomic"])
        assert cost1 == expected_cost(gateway, "mock/echo", r1)
        surplus = int(r1["paid"]["atomic"]) - cost1
        assert surplus > 0 and int(first.headers["x-tollway-credit"]) == surplus == credit(gateway, payer)

        second = chat(http, "a second, longer call that costs more than the credit covers " * 20, 500)
        assert second.status_code == 200
        r2 = wait_receipt(gateway.url, second.headers["x-tollway-receipt"])
        assert int(r2["from_credit"]["atomic"]) == surplus  # the quote was reduced by the credit
        assert int(r2["paid"]["atomic"]) == int(r2["quote"]["atomic"]) - surplus

    on_chain = sum(p.amount for p in payer.history)
    assert chain.balance(payer.account.address) == start - on_chain
    cost2 = int(r2["cost"]["atomic"])
    assert credit(gateway, payer) == on_chain - cost1 - cost2


def test_a_call_covered_by_credit_moves_nothing_on_chain(gateway, chain, payer):
    with client(gateway, payer) as http:
        big = chat(http, "fund my credit", 4000)  # a large quote, a tiny answer: most becomes credit
        assert big.status_code == 200
        wait_receipt(gateway.url, big.headers["x-tollway-receipt"])
        before_chain, before_credit = chain.balance(payer.account.address), credit(gateway, payer)
        small = chat(http, "paid from credit", 5)
        assert small.status_code == 200, small.text
    receipt = wait_receipt(gateway.url, small.headers["x-tollway-receipt"])
    assert receipt["payment"]["scheme"] == "credit" and receipt["payment"]["transaction"] is None
    assert chain.balance(payer.account.address) == before_chain
    assert credit(gateway, payer) == before_credit - int(receipt["cost"]["atomic"])
    assert len(payer.history) == 2 and payer.history[1].scheme == "credit" and payer.history[1].usd == 0


def test_withdrawal_pays_credit_out_on_chain(gateway, chain, payer):
    with client(gateway, payer) as http:
        assert chat(http, "fund my credit", 3000).status_code == 200
    wait_receipt(gateway.url, payer.history[0].receipt_id)
    owed = credit(gateway, payer)
    before = chain.balance(payer.account.address)
    # Two requests are coalesced into one payout when the worker finds both pending.
    first = payer.withdrawal(owed // 2, gateway.url)
    a = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=first)
    b = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=payer.withdrawal(owed - owed // 2, gateway.url))
    assert a.status_code == b.status_code == 202
    replay = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=first)
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "withdrawal_replayed"
    over = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=payer.withdrawal(1, gateway.url))
    assert over.status_code == 400 and over.json()["error"]["code"] == "insufficient_credit"
    for r in (a, b):
        deadline = time.monotonic() + 15
        while (doc := withdrawal(gateway.url, payer, r.json()["id"]))["state"] != "sent":
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)
    assert chain.balance(payer.account.address) == before + owed
    assert credit(gateway, payer) == 0
    # A withdrawal is its wallet's to read (and the operator's), as a receipt is.
    path = f"{gateway.url}/v1/credit/withdrawals/{a.json()['id']}"
    assert httpx.get(path).status_code == 401
    with httpx.Client(transport=SyncPayingTransport(Payer(chain.fund(), payer.allowed)), timeout=30) as other:
        r = other.get(path)
    assert r.status_code == 403 and r.json()["error"]["code"] == "withdrawal_forbidden"
    assert httpx.get(path, headers=ADMIN).json()["wallet"].lower() == payer.account.address.lower()


def test_withdrawal_refusals(gateway, payer, chain, devnet):
    other = Payer(chain.fund(), payer.allowed)
    body = payer.withdrawal(10, gateway.url)
    body["withdrawal"]["wallet"] = other.account.address  # signed by payer, claims other's credit
    r = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=body)
    assert r.status_code == 403
    r = httpx.post(f"{gateway.url}/v1/credit/withdrawals", json={"withdrawal": {"wallet": "0x1"}, "signature": "0x"})
    assert r.status_code == 400
    r = httpx.post(f"{gateway.url}/v1/credit/withdrawals", content=b"not json")
    assert r.status_code == 400
    r = httpx.get(f"{gateway.url}/v1/credit")  # who? a 401 with the sign-in to sign
    assert r.status_code == 401 and error_code(r) == "sign_in_required"
    assert "sign-in-with-x" in unb64json(r.headers["PAYMENT-REQUIRED"])["extensions"]


def test_ledger_sums_hold_after_a_random_sequence(gateway, chain, devnet, payer):
    """paid = spent + credit + withdrawn, and every charge re-derives from stored usage and prices."""
    rng = random.Random(7)
    start = chain.balance(payer.account.address)
    withdrawn = 0
    with client(gateway, payer) as http:
        for _ in range(24):
            action = rng.choice(["call", "call", "stream", "fail", "midstream", "withdraw"])
            text = " ".join(rng.choice(["alpha", "beta", "gamma", "δέλτα", "🦊"]) for _ in range(rng.randint(1, 60)))
            if action == "call":
                assert chat(http, text, rng.randint(1, 300)).status_code == 200
            elif action == "stream":
                with chat_stream(http, text, rng.randint(1, 50)) as r:
                    assert r.status_code == 200
                    r.read()
            elif action == "fail":
                assert chat(http, text, 10, mock={"fail": rng.choice([500, 429])}).status_code in (502, 503)
            elif action == "midstream":
                with chat_stream(http, text, 30, mock={"fail_after_chunks": 2}) as r:
                    r.read()
            else:
                owed = credit(gateway, payer, "available")  # only credit whose payments are final leaves
                if owed:
                    amount = rng.randint(1, owed)
                    body = payer.withdrawal(amount, gateway.url)
                    assert httpx.post(f"{gateway.url}/v1/credit/withdrawals", json=body).status_code == 202
                    withdrawn += amount
    for paid in payer.history:
        wait_receipt(gateway.url, paid.receipt_id)
    deadline = time.monotonic() + 15
    while gateway.store.payouts("pending") or gateway.store.payouts("sending"):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    from tollway.ledger.store import credit_account

    account = credit_account(f"eip155:{devnet.chain_id}", devnet.token, payer.account.address)
    journal = gateway.store.journal(account)
    deposits, charges = journal.get("deposit", 0), -journal.get("charge", 0)
    assert journal.get("hold", 0) + journal.get("release", 0) == 0  # no call left holding credit
    assert -journal.get("withdrawal", 0) == withdrawn
    balance = gateway.store.credit_balance(account)
    assert deposits == charges + balance + withdrawn
    on_chain_paid = sum(p.amount for p in payer.history if p.transaction)
    assert deposits == on_chain_paid
    assert chain.balance(payer.account.address) == start - on_chain_paid + withdrawn

    from sqlalchemy import select

    paid_by_payer = PAYMENTS.c.payer == payer.account.address.lower()
    with gateway.store.engine.connect() as c:
        query = select(CALLS).join(PAYMENTS, CALLS.c.payment_id == PAYMENTS.c.id).where(paid_by_payer)
        rows = c.execute(query).mappings().all()
    charged = 0
    for row in rows:
        if row["status"] == "failed":
            assert row["cost"] is None
            continue
        if row["prompt_tokens"] is not None:
            usage = Usage(
                row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["cache_write_tokens"]
            )
            price = gateway.settings.models[row["model"]]
            from tollway.pricing import Prices

            assert row["cost"] == min(Prices.of(price, 6).cost(usage), row["quote"], row["paid"] + row["from_credit"])
        charged += row["cost"]
    assert charged == charges


def test_almost_enough_credit_asks_for_a_top_up_not_dust(gateway, chain, payer):
    """Credit a few units short of a quote: the on-chain part is the minimum payment, not dust."""
    from tollway.config import resolve_chain

    least = int(resolve_chain(gateway.settings, chain.devnet.chain_id).min_chain_payment_usd * 10**6)
    with client(gateway, payer) as http:
        assert chat(http, "fund my credit", 600).status_code == 200
    wait_receipt(gateway.url, payer.history[0].receipt_id)
    owed = credit(gateway, payer)

    def offers(max_tokens: int) -> list[dict]:
        r = httpx.post(
            f"{gateway.url}{CHAT}", headers=payer.wallet_header(gateway.url), json=chat_body("x", max_tokens=max_tokens)
        )
        return payment_required(r)["accepts"]

    def covered(max_tokens: int) -> bool:
        return any(o["scheme"] == "credit" for o in offers(max_tokens))

    low, high = 1, 100_000  # each output token adds 2 units to the quote: the first quote above the credit
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if covered(mid) else (low, mid)
    max_tokens = low
    exact = next(o for o in offers(max_tokens) if o["scheme"] == "exact")
    quote = int(exact["amount"]) + int(exact["extra"].get("credit", 0))
    assert 0 < quote - owed <= 2
    assert int(exact["amount"]) == max(quote - owed, least) == least


def test_an_exact_payment_echoing_the_credit_offer_cannot_pay_less_than_the_least_payment(gateway, chain, payer):
    """The credit offer is the bare quote; a payment on chain is never below the least one (its
    settlement costs gas). A quote token binds no scheme, so the credit offer's, echoed by an
    ``exact`` payment of a tiny call, must not settle dust (attack: the operator's gas drained)."""
    from support import envelope, payment_header, sign_exact
    from tollway.config import resolve_chain

    least = int(resolve_chain(gateway.settings, chain.devnet.chain_id).min_chain_payment_usd * 10**6)
    with client(gateway, payer) as http:
        assert chat(http, "fund my credit", 600).status_code == 200
    wait_receipt(gateway.url, payer.history[0].receipt_id)
    body = chat_body("a tiny call", max_tokens=1)
    required = payment_required(httpx.post(f"{gateway.url}{CHAT}", headers=payer.wallet_header(gateway.url), json=body))
    offer = next(o for o in required["accepts"] if o["scheme"] == "credit")
    assert int(offer["amount"]) < least
    forged = {**offer, "scheme": "exact", "extra": {**offer["extra"], "name": "USD Coin", "version": "2"}}
    doc = envelope(required, forged, sign_exact(chain.fund(), forged, int(time.time())))
    r = httpx.post(f"{gateway.url}{CHAT}", headers=payment_header(doc), json=body)
    assert r.status_code == 402 and error_code(r) == "quote_mismatch", r.text[:300]


def test_a_stream_left_open_by_a_crash_is_metered_at_the_next_start(devnet, upstream, tmp_path):
    """A process died mid-stream: its call was never metered and still held credit. The next
    gateway on that ledger charges it its quote and releases the hold; the sums hold again."""
    from conftest import gateway_settings
    from support import ServerThread
    from tollway.app import create_app
    from tollway.ledger import Store
    from tollway.ledger.store import credit_account

    settings = gateway_settings(devnet, upstream.url + "/v1", tmp_path / "l.sqlite3")
    store = Store(settings.database_url)
    payer, network = "0x" + "ab" * 20, f"eip155:{devnet.chain_id}"
    account = credit_account(network, devnet.token, payer)
    store.settle_call_credit(account, deposit=5000, held=0, cost=0, call_id="earlier", payment_id=None)
    locked = store.lock(
        {
            "lock_key": "k",
            "scheme": "exact",
            "network": network,
            "asset": devnet.token.lower(),
            "payer": payer,
            "payee": devnet.payee.lower(),
            "amount": 1000,
            "proof": "{}",
            "request_digest": "d",
        },
        account,
        2000,
        call_id="lost",
    )
    assert locked is not None and locked.held
    payment_id = locked.payment_id
    assert store.mark_prepaid(payment_id)  # its money moved as the stream began (as an exact payment's does)
    store.insert_call(
        {
            "id": "lost",
            "payment_id": payment_id,
            "model": "mock/echo",
            "upstream_model": "mock/echo",
            "stream": True,
            "status": "streaming",
            "quote": 3000,
            "paid": 1000,
            "from_credit": 2000,
            "created_at": time.time() - 3600,
        }
    )
    with ServerThread(create_app(settings)) as gw:
        receipt = read_receipt(gw.url, "lost")
    assert receipt["status"] == "incomplete" and receipt["cost"]["atomic"] == "3000"
    journal = store.journal(account)
    assert journal["hold"] + journal["release"] == 0
    assert store.credit_balance(account) == 5000 + 1000 - 3000


async def test_parallel_calls_from_funded_wallets_never_see_a_payment_error(gateway, chain, devnet):
    """Agents make tool calls in parallel: 300 calls at concurrency 16 from two fresh wallets,
    streamed and not — one paying ``upto``, the other without a Permit2 approval (told so by a
    412, it pays ``exact``, and the surplus becomes credit that its sign-ins then spend) — not one
    payment error (the client lets one call at a time sign in for credit and re-pays a quote the
    credit moved under)."""
    import asyncio

    from tollway.client import PayingTransport

    asset = [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)]
    payers = [Payer(chain.fund(permit2=True), asset), Payer(chain.fund(), asset)]
    clients = [httpx.AsyncClient(transport=PayingTransport(p), base_url=gateway.url, timeout=60) for p in payers]
    gate = asyncio.Semaphore(16)
    statuses: list[int] = []

    async def call(i: int) -> None:
        body = chat_body(f"parallel call {i}", max_tokens=5 + i % 7, stream=i % 3 == 0)
        async with gate:
            r = await clients[i % 2].post(CHAT, json=body)
            statuses.append(r.status_code)
            assert r.status_code == 200, r.text[:300]

    try:
        await asyncio.gather(*(call(i) for i in range(300)))
    finally:
        for c in clients:
            await c.aclose()
    assert statuses.count(200) == 300
    assert {paid.scheme for paid in payers[0].history} == {"upto"}
    assert {paid.scheme for paid in payers[1].history} == {"exact", "credit"}  # credit paid some of them


def test_withdrawals_have_a_minimum(gateway, chain, devnet, tmp_path):
    """A payout is a transfer whose gas the gateway pays: below the minimum (default $0.01) it is refused."""
    from support import dedicated_gateway

    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)])
    with dedicated_gateway(gateway, chain, tmp_path, min_withdrawal_usd=None) as (url, _):
        r = httpx.post(f"{url}/v1/credit/withdrawals", json=payer.withdrawal(9_999, url))
    assert r.status_code == 400 and r.json()["error"]["code"] == "withdrawal_too_small"
    assert "10000 units" in r.json()["error"]["message"]


def test_withdrawals_the_payout_account_cannot_pay_wait_for_its_tokens_and_spend_no_gas(
    gateway, chain, devnet, tmp_path
):
    """A transfer the payout account cannot pay would revert and give the credit back, to be
    withdrawn again at once: gas spent for nothing, each round. It waits until the tokens are there."""
    from eth_account import Account

    from support import dedicated_gateway

    payout = Account.create()  # gas, no tokens (the operator swept them, say)
    chain.w3.provider.make_request("anvil_setBalance", [payout.address, hex(10**18)])
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    with dedicated_gateway(gateway, chain, tmp_path, chain_settings={"payout_key": "0x" + payout.key.hex()}) as (
        url,
        _,
    ):
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=30) as http:
            assert http.post(CHAT, json=chat_body("fund my credit", max_tokens=3000)).status_code == 200
        wait_receipt(url, payer.history[0].receipt_id)
        owed = read_credit(url, payer)
        r = httpx.post(f"{url}/v1/credit/withdrawals", json=payer.withdrawal(owed, url))
        assert r.status_code == 202, r.text
        time.sleep(2)  # (the worker's passes meanwhile)
        assert withdrawal(url, payer, r.json()["id"])["state"] == "pending"
        assert chain.w3.eth.get_transaction_count(payout.address) == 0  # no transfer sent, no gas spent
        tokens = chain.fund(owed, eth=True)
        chain.transfer(tokens, payout.address, owed)
        deadline = time.monotonic() + 20
        while (doc := withdrawal(url, payer, r.json()["id"]))["state"] != "sent":
            assert time.monotonic() < deadline and doc["state"] != "failed", doc
            time.sleep(0.1)
    assert chain.balance(payout.address) == 0


def test_attack_two_wallets_withdraw_at_once_more_than_the_payout_account_holds(gateway, chain, devnet, tmp_path):
    """Two payers withdraw together what the payout account can pay one of: one transfer goes out,
    the other waits — none is sent to revert (gas the gateway would pay for a payout that gives the
    credit back, to be asked again)."""
    from eth_account import Account

    from support import dedicated_gateway

    payout = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [payout.address, hex(10**18)])
    payers = [
        Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
        for _ in range(2)
    ]
    settings = {"payout_key": "0x" + payout.key.hex()}
    with dedicated_gateway(gateway, chain, tmp_path, chain_settings=settings) as (url, _):
        owed = []
        for payer in payers:
            with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=30) as http:
                assert http.post(CHAT, json=chat_body("fund my credit", max_tokens=3000)).status_code == 200
            wait_receipt(url, payer.history[0].receipt_id)
            owed.append(read_credit(url, payer))
        tokens = chain.fund(max(owed), eth=True)
        chain.transfer(tokens, payout.address, max(owed))  # (enough for either, not for both)
        asked = [
            httpx.post(f"{url}/v1/credit/withdrawals", json=p.withdrawal(o, url))
            for p, o in zip(payers, owed, strict=True)
        ]
        assert [r.status_code for r in asked] == [202, 202], [r.text for r in asked]
        time.sleep(3)  # (the worker's passes)
        states = sorted(withdrawal(url, p, r.json()["id"])["state"] for p, r in zip(payers, asked, strict=True))
    assert states in (["pending", "sent"], ["pending", "sending"]), states
    assert chain.w3.eth.get_transaction_count(payout.address) == 1  # one transfer; no revert paid for


def test_credit_leaves_on_chain_only_once_the_settlement_that_deposited_it_is_final(gateway, chain, devnet, tmp_path):
    """A settlement is believed as it is mined, and its credit pays for calls at once; paid out on
    chain, though, it would stand where a reorganisation undid the settlement: a withdrawal waits
    until the settlement is ``confirmations`` deep."""
    from eth_account import Account

    from support import dedicated_gateway

    payout = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [payout.address, hex(10**18)])
    payer = Payer(chain.fund(), [AllowedAsset(f"eip155:{devnet.chain_id}", devnet.token)], schemes=("exact",))
    settings = {"payout_key": "0x" + payout.key.hex(), "confirmations": 3}
    tokens = chain.fund(10**6, eth=True)
    chain.transfer(tokens, payout.address, 10**6)  # (before: no block may come between the settlement and the ask)
    with dedicated_gateway(gateway, chain, tmp_path, chain_settings=settings) as (url, _):
        with httpx.Client(transport=SyncPayingTransport(payer), base_url=url, timeout=30) as http:
            assert http.post(CHAT, json=chat_body("fund my credit", max_tokens=3000)).status_code == 200
        settled = wait_receipt(url, payer.history[0].receipt_id)
        owed = read_credit(url, payer)
        mined = chain.w3.eth.get_transaction_receipt(settled["payment"]["transaction"])["blockNumber"]
        early = httpx.post(f"{url}/v1/credit/withdrawals", json=payer.withdrawal(owed, url))
        assert early.status_code == 409 and early.json()["error"]["code"] == "credit_not_final", early.text
        assert f"block {mined + 3}" in early.json()["error"]["message"] and int(early.headers["retry-after"]) >= 1
        assert read_credit(url, payer) == owed  # (nothing taken)
        chain.mine(mined + 3 - chain.w3.eth.block_number)
        r = httpx.post(f"{url}/v1/credit/withdrawals", json=payer.withdrawal(owed, url))
        assert r.status_code == 202, r.text

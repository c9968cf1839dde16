"""tollway's paying client against a hostile gateway: what it signs stays within its limits
whatever the gateway says afterwards, and a malformed answer is refused (or shown) — never a
traceback. The gateway is an httpx transport; every captured payment is checked to be a valid,
spendable signature of the payer's."""

from __future__ import annotations

import base64
import json
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx
import pytest
from eth_account import Account

from tollway import cli
from tollway.client import AllowedAsset, Payer, PaymentRefused, SyncPayingTransport, refund_channel
from tollway.client.channels import MISMATCH
from tollway.payments import channel as ch
from tollway.payments import eip3009
from tollway.payments.x402 import b64json, unb64json

KEY = "0x" + "4c" * 32
ACCOUNT = Account.from_key(KEY)
NETWORK, CHAIN_ID = "eip155:8453", 8453
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
THIEF = "0x000000000000000000000000000000000000dEaD"
ORIGIN = "http://gw.test"
URL = ORIGIN + "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WALLET = ["--url", ORIGIN, "--key", KEY, "--allow", f"{NETWORK}:{USDC}"]


def payer(**limits: Any) -> Payer:
    return Payer(ACCOUNT, [AllowedAsset(NETWORK, USDC)], **limits)


def offer(scheme: str, amount: int, timeout: Any = 300, **extra: Any) -> dict[str, Any]:
    e = {"name": "USD Coin", "version": "2", **extra}
    if scheme == "batch-settlement":
        e = {"receiverAuthorizer": THIEF, "withdrawDelay": 900, **e}
    if scheme == "upto":
        e = {"facilitatorAddress": THIEF, **e}
    doc = {"scheme": scheme, "network": NETWORK, "asset": USDC, "amount": str(amount), "payTo": THIEF, "extra": e}
    return {**doc, "maxTimeoutSeconds": timeout}


def required(*offers: dict[str, Any], error: str | None = None, **extensions: Any) -> dict[str, str]:
    doc: dict[str, Any] = {"x402Version": 2, "resource": {"url": URL}, "accepts": list(offers)}
    doc |= {"error": error} if error else {}
    return {"PAYMENT-REQUIRED": b64json(doc | ({"extensions": extensions} if extensions else {}))}


def without(o: dict[str, Any], key: str) -> dict[str, Any]:
    o = json.loads(json.dumps(o))
    (o["extra"] if key in o["extra"] else o).pop(key)
    return o


def served(headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]}, headers=headers or {})


class Gateway(httpx.BaseTransport):
    """A gateway answering by ``answer(request)``, keeping every payment it is sent (decoded)."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.paid = answer, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        if request.headers.get("PAYMENT-SIGNATURE"):
            self.paid.append(unb64json(request.headers["PAYMENT-SIGNATURE"]))
        r = self.answer(request)
        return httpx.Response(r.status_code, headers=r.headers, stream=httpx.ByteStream(r.content), request=request)


def calls(p: Payer, gateway: Gateway, n: int, **kw: Any) -> list[Any]:
    """``n`` calls: each one's status, or the refusal it ended with."""
    out: list[Any] = []
    with httpx.Client(transport=SyncPayingTransport(p, gateway)) as client:
        for _ in range(n):
            try:
                out.append(client.post(URL, json=BODY, **kw).status_code)
            except PaymentRefused as refused:
                out.append(refused)
    return out


def exact_signed(gateway: Gateway) -> Decimal:
    """USD of the exact payments the gateway holds, each checked to be the payer's signature."""
    total = 0
    for doc in gateway.paid:
        a = doc["payload"]["authorization"]
        auth = eip3009.Authorization(
            a["from"].lower(), a["to"].lower(), int(a["value"]), int(a["validAfter"]), int(a["validBefore"]),
            bytes.fromhex(a["nonce"][2:]),
        )  # fmt: skip
        domain = eip3009.domain_separator("USD Coin", "2", CHAIN_ID, USDC)
        signer = eip3009.recover(eip3009.digest(auth, domain), bytes.fromhex(doc["payload"]["signature"][2:]))
        assert signer == ACCOUNT.address.lower()
        total += auth.value
    return Decimal(total).scaleb(-6)


def paid_headers(request: httpx.Request) -> bool:
    return "PAYMENT-SIGNATURE" in request.headers


def asking(o: dict[str, Any], then: Any = served) -> Any:
    """A gateway's answers: 402 for ``o`` to a request not paid, ``then`` (an answer, or what makes one) to one paid."""
    return lambda r: (
        (then() if callable(then) else then) if paid_headers(r) else httpx.Response(402, headers=required(o))
    )


@pytest.mark.parametrize(
    "after",
    [
        served,  # served, with no settlement response: "not paid"
        lambda: served({"PAYMENT-RESPONSE": "%%%"}),  # a settlement response that is not one
        lambda: httpx.Response(402, headers=required(offer("exact", 500_000), error="quote_expired")),
        lambda: httpx.Response(502, json={"error": "upstream"}),
    ],
)
def test_a_payment_the_gateway_says_it_did_not_take_stays_counted(after):
    gateway = Gateway(asking(offer("exact", 500_000), after))
    p = payer(max_per_call_usd=Decimal(1), max_total_usd=Decimal(1), schemes=("exact",))
    outcomes = calls(p, gateway, 5)
    assert exact_signed(gateway) <= p.max_total_usd == p.spent_usd
    assert isinstance(outcomes[-1], PaymentRefused) and "session limit" in str(outcomes[-1])


def test_the_attempts_of_one_call_share_its_per_call_limit():
    retry = httpx.Response(402, headers=required(offer("exact", 400_000), error="amount_insufficient"))
    gateway = Gateway(lambda r: retry)
    p = payer(max_per_call_usd=Decimal(1), max_total_usd=Decimal(100), schemes=("exact",))
    (outcome,) = calls(p, gateway, 1)
    assert isinstance(outcome, PaymentRefused) and "per-call limit" in str(outcome)
    assert len(gateway.paid) == 2 and exact_signed(gateway) == Decimal("0.8")  # (a third would pass $1)


def test_an_upto_payment_refused_for_want_of_a_permit2_approval_is_not_counted_once():
    def answer(r: httpx.Request) -> httpx.Response:
        if not paid_headers(r):
            return httpx.Response(402, headers=required(offer("upto", 500_000), offer("exact", 500_000)))
        if unb64json(r.headers["PAYMENT-SIGNATURE"])["accepted"]["scheme"] == "upto":
            return httpx.Response(412, headers=required(offer("exact", 500_000), error="permit2_allowance_required"))
        return served()

    p = payer(max_per_call_usd=Decimal("0.5"), max_total_usd=Decimal(1))
    assert calls(p, Gateway(answer), 2) == [200, 200]  # (upto once, refused; then exact, within the limits)
    assert p.spent_usd == Decimal(1)


def test_upto_payments_of_calls_under_way_when_the_412_comes_are_not_counted_either():
    """Two calls sign upto at once, before the gateway's first 412 comes back: neither counts."""
    import threading

    both_signed = threading.Barrier(2, timeout=10)

    def answer(r: httpx.Request) -> httpx.Response:
        if not paid_headers(r):
            return httpx.Response(402, headers=required(offer("upto", 500_000), offer("exact", 500_000)))
        if unb64json(r.headers["PAYMENT-SIGNATURE"])["accepted"]["scheme"] == "upto":
            both_signed.wait()
            return httpx.Response(412, headers=required(offer("exact", 500_000), error="permit2_allowance_required"))
        return served()

    p, gateway = payer(max_per_call_usd=Decimal("0.5"), max_total_usd=Decimal(1)), Gateway(answer)
    outcomes: list[Any] = []
    threads = [threading.Thread(target=lambda: outcomes.extend(calls(p, gateway, 1))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [200, 200] and p.spent_usd == Decimal(1)


def test_a_negative_credit_in_an_offer_does_not_lower_its_price():
    gateway = Gateway(lambda r: httpx.Response(402, headers=required(offer("exact", 9_000_000, credit="-8990000"))))
    p = payer(max_per_call_usd=Decimal("0.01"), schemes=("exact",))
    (outcome,) = calls(p, gateway, 1)
    assert isinstance(outcome, PaymentRefused) and gateway.paid == [] and p.spent_usd == 0


SIGN_IN = {
    "info": {
        "domain": "gw.test",
        "uri": URL,
        "version": "1",
        "nonce": "0123456789abcdef",
        "issuedAt": "2026-01-01T00:00:00Z",
    },
    "supportedChains": [{"chainId": NETWORK, "type": "eip191"}],
}


def from_credit(quote: int, served_by_credit: Any) -> Any:
    """A gateway whose 402 for ``quote`` declares a sign-in, and that serves a signed-in call from the
    wallet's credit: ``served_by_credit`` is its answer (it charges the credit whatever the client's limits)."""

    def answer(r: httpx.Request) -> httpx.Response:
        if "SIGN-IN-WITH-X" in r.headers:
            return served_by_credit
        return httpx.Response(402, headers=required(offer("exact", quote), **{"sign-in-with-x": SIGN_IN}))

    return answer


@pytest.mark.parametrize("limit", ["per call", "the call's own max_usd", "the metered quote"])
def test_a_call_quoted_over_its_limit_is_not_paid_from_credit_either(limit):
    """Signing in lets the credit pay the whole quote: the client signs in only within its per-call
    limit — that of the largest quote offered, as a call served from credit is held and charged as a
    metered one (upto's quote, priced for more output than exact's)."""
    gateway = Gateway(from_credit(5_000_000, served({"x-tollway-cost": "5000000"})))
    p = payer(max_per_call_usd=Decimal(10))
    kw: dict[str, Any] = {}
    if limit == "per call":
        p.max_per_call_usd = Decimal(1)
    elif limit == "the call's own max_usd":
        kw = {"extensions": {"tollway.max_usd": Fraction(1, 100)}}
    else:  # (a payer of exact only, quoted $0.50 for exact, $5 for upto)
        offers = required(offer("exact", 500_000), offer("upto", 5_000_000), **{"sign-in-with-x": SIGN_IN})
        gateway = Gateway(lambda r: served() if "SIGN-IN-WITH-X" in r.headers else httpx.Response(402, headers=offers))
        p = payer(max_per_call_usd=Decimal(1), schemes=("exact",))
    (refused,) = calls(p, gateway, 1, **kw)
    assert isinstance(refused, PaymentRefused)


def test_a_402_with_a_sign_in_and_an_offer_that_is_no_object_is_read_without_a_traceback():
    """The offer that is no object is passed over (it raised AttributeError); the other one is paid."""
    doc = {"x402Version": 2, "resource": {"url": URL}, "accepts": ["x", offer("exact", 1000)]}
    doc["extensions"] = {"sign-in-with-x": SIGN_IN}
    gateway = Gateway(lambda r: httpx.Response(402, headers={"PAYMENT-REQUIRED": b64json(doc)}))
    assert calls(payer(), gateway, 1) == [402] and gateway.paid  # (the gateway refused it: still a 402)


def test_a_call_the_credit_does_not_cover_pays_the_rest_counted_once():
    def answer(r: httpx.Request) -> httpx.Response:
        if paid_headers(r):
            return served({"PAYMENT-RESPONSE": b64json({"success": True})})
        if "SIGN-IN-WITH-X" in r.headers:  # the credit fell short: the rest, on chain
            return httpx.Response(402, headers=required(offer("exact", 200_000, credit="300000")))
        return httpx.Response(402, headers=required(offer("exact", 500_000), **{"sign-in-with-x": SIGN_IN}))

    gateway = Gateway(answer)
    p = payer()
    assert calls(p, gateway, 1) == [200]
    assert p.spent_usd == exact_signed(gateway) == Decimal("0.2")


def test_a_signature_lives_no_longer_than_the_payer_allows():
    gateway = Gateway(asking(offer("exact", 10_000, timeout=10**9)))
    (outcome,) = calls(payer(schemes=("exact",)), gateway, 1)
    assert isinstance(outcome, PaymentRefused) and gateway.paid == []
    gateway = Gateway(asking(offer("exact", 10_000, timeout=600)))
    assert calls(payer(schemes=("exact",)), gateway, 1) == [200]
    lifetime = int(gateway.paid[0]["payload"]["authorization"]["validBefore"]) - time.time()
    assert 590 < lifetime <= 600


def voucher_total(doc: dict[str, Any]) -> int:
    v = doc["payload"]["voucher"]
    total, signature = int(v["maxClaimableAmount"]), bytes.fromhex(v["signature"][2:])
    voucher = ch.Voucher(bytes.fromhex(v["channelId"][2:]), total, signature)
    assert ch.voucher_signer(voucher, CHAIN_ID) == ACCOUNT.address.lower()
    return total


def test_a_channel_charge_above_the_calls_voucher_is_not_signed_for_next():
    charged = {"PAYMENT-RESPONSE": b64json({"success": True, "extra": {"chargedAmount": str(990_000)}})}
    first = offer("batch-settlement", 10_000, minDeposit="1000000")
    gateway = Gateway(asking(first, served(charged)))
    p = payer(schemes=("batch-settlement",))
    assert calls(p, gateway, 2) == [200, 200]
    assert [voucher_total(d) for d in gateway.paid] == [10_000, 20_000]  # (not the deposit's whole $1)
    assert p.spent_usd == Decimal("0.02")


def corrective(last: dict[str, Any], amount: int, charged: Any) -> httpx.Response:
    """A corrective 402 for ``amount``: the channel's charged total is ``charged``, its last voucher
    the payer's ``last`` payment's."""
    v = last["payload"]["voucher"]
    state = {"channelId": v["channelId"], "balance": "2000000", "chargedCumulativeAmount": charged}
    voucher = {"signedMaxClaimable": v["maxClaimableAmount"], "signature": v["signature"]}
    terms = offer("batch-settlement", amount, channelState=state, voucherState=voucher)
    return httpx.Response(402, headers=required(terms, error=MISMATCH))


def test_a_channel_call_corrected_after_a_stream_counts_what_its_vouchers_add_not_their_prices():
    """A stream is charged as it ends (its answer says "0"): the next call's voucher is answered with
    a corrective 402, and its retry signs what the stream cost on top of the first attempt's
    voucher — $0.6 more for the call in all, within its $1 limit, though each attempt quotes $0.7."""

    def answer(r: httpx.Request) -> httpx.Response:
        paid = gateway.paid
        if not paid_headers(r):
            return httpx.Response(402, headers=required(offer("batch-settlement", 300_000 if not paid else 700_000)))
        if len(paid) == 2:  # (the stream cost $0.2: the gateway counts another total)
            return corrective(paid[0], 700_000, "200000")
        return served({"PAYMENT-RESPONSE": b64json({"success": True, "extra": {"chargedAmount": "0"}})})

    gateway = Gateway(answer)
    p = payer(max_per_call_usd=Decimal(1), schemes=("batch-settlement",))
    p.channel(offer("batch-settlement", 0)).balance = 2_000_000  # (deposited before)
    assert calls(p, gateway, 2) == [200, 200]
    assert [voucher_total(d) for d in gateway.paid] == [300_000, 700_000, 900_000]
    assert p.spent_usd == Decimal("0.9")


def voucher_of(pending: Any) -> int:
    return int(unb64json(pending.headers["PAYMENT-SIGNATURE"])["payload"]["voucher"]["maxClaimableAmount"])


def test_a_call_concluding_while_another_signs_its_voucher_does_not_take_that_one_over_its_limit(monkeypatch):
    """Threads share a payer: call B's answer (its $0.9 charged) lands after call A's offer of $1.9
    was found to add $1 to the highest voucher, and before A signs — A signing then would add $1.9."""
    p = payer(max_per_call_usd=Decimal(1), max_total_usd=Decimal(100), schemes=("batch-settlement",))
    p.channel(offer("batch-settlement", 0)).balance = 10_000_000  # (deposited before)
    b = p.prepare(required(offer("batch-settlement", 900_000)), ORIGIN)
    choose = Payer.choose

    def b_answered_meanwhile(self: Payer, *a: Any, **kw: Any) -> Any:
        chosen = choose(self, *a, **kw)
        self.conclude(b, 200, {"PAYMENT-RESPONSE": b64json({"success": True, "extra": {"chargedAmount": "900000"}})})
        return chosen

    monkeypatch.setattr(Payer, "choose", b_answered_meanwhile)
    with pytest.raises(PaymentRefused, match="moved"):
        p.prepare(required(offer("batch-settlement", 1_900_000)), ORIGIN)
    assert voucher_of(b) == 900_000 and p.spent_usd == Decimal("0.9")  # (A's reservation given back)


@pytest.mark.parametrize("charged", [str(-(10**9)), "1.5", None])
def test_a_corrective_402_stating_a_negative_or_malformed_total_is_not_believed(charged):
    def answer(r: httpx.Request) -> httpx.Response:
        paid = gateway.paid
        if not paid_headers(r):
            return httpx.Response(402, headers=required(offer("batch-settlement", 100_000)))
        if len(paid) == 1:
            return corrective(paid[0], 100_000, charged)
        return served({"PAYMENT-RESPONSE": b64json({"success": True, "extra": {"chargedAmount": "100000"}})})

    gateway = Gateway(answer)
    p = payer(max_per_call_usd=Decimal(1), schemes=("batch-settlement",))
    p.channel(offer("batch-settlement", 0)).balance = 2_000_000
    assert calls(p, gateway, 2) == [200, 200]  # (the retry signs on the totals it knew)
    assert [voucher_total(d) for d in gateway.paid] == [100_000, 100_000, 200_000]


DEPOSIT = offer("batch-settlement", 10_000, minDeposit="5000000")
TAKEN = {"PAYMENT-RESPONSE": b64json({"success": True, "extra": {"chargedAmount": "10000"}})}


def deposits(gateway: Gateway) -> list[int]:
    return [int(d["payload"]["deposit"]["amount"]) for d in gateway.paid if d["payload"].get("type") == "deposit"]


@pytest.mark.parametrize("said", [{}, TAKEN])  # (served not saying the deposit was taken; saying so)
def test_deposits_stay_within_their_limit_whatever_the_gateway_says_of_them(said):
    def answer(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/v1/channels/refund" and paid_headers(r):  # "refunded" (it was not)
            return httpx.Response(200, headers={"PAYMENT-RESPONSE": b64json({"success": True, "amount": "5000000"})})
        return served(said) if paid_headers(r) else httpx.Response(402, headers=required(DEPOSIT))

    gateway = Gateway(answer)
    p = payer(max_deposit_usd=Decimal(5), schemes=("batch-settlement",))
    assert calls(p, gateway, 1) == [200]
    if said:
        with httpx.Client(transport=gateway, base_url=ORIGIN) as http:
            refund_channel(p, http)
    (outcome,) = calls(p, gateway, 1)
    assert isinstance(outcome, PaymentRefused) and "deposit" in str(outcome)
    assert deposits(gateway) == [5_000_000]
    assert p.spent_usd == Decimal("0.01")  # (the refused call's reservation given back: nothing was signed)


def wire(monkeypatch, answer: Any) -> Gateway:
    """Every transport the CLI makes talks to the gateway ``answer``."""
    gateway = Gateway(answer)
    monkeypatch.setattr(httpx, "HTTPTransport", lambda *a, **k: gateway)
    monkeypatch.setattr(httpx._client, "HTTPTransport", lambda *a, **k: gateway)  # (plain clients' default)
    return gateway


def test_tollway_chat_max_usd_bounds_a_deposit_too(monkeypatch, capsys):
    big = offer("batch-settlement", 1_000, minDeposit="10000000")
    gateway = wire(monkeypatch, lambda r: httpx.Response(402, headers=required(big)))
    assert cli.main(["chat", "hi", *WALLET, "--max-usd", "0.01", "--scheme", "batch-settlement"]) == 1
    assert gateway.paid == [] and "deposit" in capsys.readouterr().err


def test_tollway_channel_status_signs_in_and_pays_nothing(monkeypatch):
    terms = offer("batch-settlement", 1_000_000, minDeposit="10000000")
    gateway = wire(monkeypatch, lambda r: httpx.Response(402, headers=required(terms)))
    assert cli.main(["channel", "status", *WALLET]) == 1
    assert gateway.paid == []


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(402, headers={"PAYMENT-REQUIRED": b64json({"x402Version": 2, "accepts": ["x"]})}),
        httpx.Response(402, headers=required(without(offer("batch-settlement", 1), "receiverAuthorizer"))),
        httpx.Response(200, json={}),  # no settlement response
        httpx.Response(200, headers={"PAYMENT-RESPONSE": b64json({"success": True, "amount": "5"})}),  # not asked
    ],
)
def test_tollway_channel_refund_refuses_an_answer_that_is_not_one(monkeypatch, answer):
    wire(monkeypatch, lambda r: answer)
    assert cli.main(["channel", "refund", *WALLET]) == 1


def mpp(terms: dict[str, Any], **params: Any) -> dict[str, str]:
    p = {"id": "abc", "realm": "gw.test", "method": "evm", "intent": "charge", "expires": "2030-01-01T00:00:00Z"}
    p = {**p, **params, "request": base64.urlsafe_b64encode(json.dumps(terms).encode()).decode().rstrip("=")}
    return {"WWW-Authenticate": "Payment " + ", ".join(f'{k}="{v}"' for k, v in p.items() if v is not None)}


HUGE = "9" * 5000  # (within the 16 kB header bound in base64)
MPP_TERMS = {"amount": "1000", "currency": USDC, "recipient": THIEF, "methodDetails": {"chainId": CHAIN_ID}}


def soon() -> str:
    """Two minutes from now, as the test runs (not as it is collected: the suite outlasts that)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))


MPP_TERMS["methodDetails"]["credentialTypes"] = ["authorization"]


MALFORMED_402 = {
    "not base64": ({"PAYMENT-REQUIRED": "%%% not base64 %%%"}, "exact"),
    "accepts a string": ({"PAYMENT-REQUIRED": b64json({"x402Version": 2, "accepts": ["exact"]})}, "exact"),
    "accepts an object": ({"PAYMENT-REQUIRED": b64json({"x402Version": 2, "accepts": {"scheme": "exact"}})}, "exact"),
    "resource a string": (
        {"PAYMENT-REQUIRED": b64json({"x402Version": 2, "resource": URL, "accepts": [offer("exact", 1)]})},
        "exact",
    ),
    "credit not a number": (required(offer("exact", 1, credit="lots")), "exact"),
    "extra a string": (required({**offer("exact", 1), "extra": "x"}), "exact"),
    "exact without payTo": (required(without(offer("exact", 1), "payTo")), "exact"),
    "timeout not a number": (required(offer("exact", 1, timeout="soon")), "exact"),
    "upto without facilitator": (required(without(offer("upto", 1), "facilitatorAddress")), "upto"),
    "channel without withdrawDelay": (
        required(without(offer("batch-settlement", 1), "withdrawDelay")),
        "batch-settlement",
    ),
    "extensions a string": (
        {"PAYMENT-REQUIRED": b64json({"x402Version": 2, "accepts": [], "extensions": "x"})},
        "exact",
    ),
    "mpp without expires": (mpp(MPP_TERMS, expires=None), "exact"),
    "mpp with a bad expiry": (mpp(MPP_TERMS, expires="tomorrow"), "exact"),
    "mpp expiring in ten years": (mpp(MPP_TERMS, expires="2036-01-01T00:00:00Z"), "exact"),
    "mpp with a superscript amount": (lambda: mpp({**MPP_TERMS, "amount": "\u00b2"}, expires=soon()), "exact"),
    "mpp without a recipient": (
        lambda: mpp({k: v for k, v in MPP_TERMS.items() if k != "recipient"}, expires=soon()),
        "exact",
    ),
    # (beyond int()'s 4,300 digits: a ValueError escaped the client)
    "an amount of 5,000 digits": (required(offer("exact", HUGE)), "exact"),
    "an upto amount of 5,000 digits": (required(offer("upto", HUGE)), "upto"),
    "a channel price of 5,000 digits": (required(offer("batch-settlement", HUGE)), "batch-settlement"),
    "a credit of 5,000 digits": (required(offer("exact", 1000, credit=HUGE)), "exact"),
    "mpp with an amount of 5,000 digits": (lambda: mpp({**MPP_TERMS, "amount": HUGE}, expires=soon()), "exact"),
}


@pytest.mark.parametrize("name", MALFORMED_402)
def test_a_malformed_402_is_refused_and_costs_nothing(name, monkeypatch):
    headers, scheme = MALFORMED_402[name]
    headers = headers() if callable(headers) else headers
    gateway = Gateway(lambda r: httpx.Response(402, headers=headers))
    p = payer(schemes=(scheme,))
    (outcome,) = calls(p, gateway, 1)
    assert isinstance(outcome, PaymentRefused) and p.spent_usd == 0 and p.deposited_usd == 0
    wire(monkeypatch, lambda r: httpx.Response(402, headers=headers))
    assert cli.main(["chat", "hi", *WALLET, "--scheme", scheme]) == 1


@pytest.mark.parametrize(
    ("stream", "answer"),
    [
        (True, httpx.Response(200, content=b"data: {not json\n\n")),
        (True, httpx.Response(200, content=b": tollway {oops\n\n")),
        (False, httpx.Response(200, json={"error": "none"})),
        (False, served({"x-tollway-cost": "lots", "PAYMENT-RESPONSE": b64json({"success": True})})),
        (False, served({"x-tollway-cache": "[{", "PAYMENT-RESPONSE": b64json({"success": True})})),
        (False, served({"PAYMENT-RESPONSE": b64json({"success": True, "amount": HUGE})})),
    ],
)
def test_tollway_chat_shows_a_malformed_paid_answer_without_a_traceback(stream, answer, monkeypatch):
    wire(monkeypatch, asking(offer("exact", 1000), answer))
    assert cli.main(["chat", "hi", *WALLET, "--scheme", "exact", *(["--stream"] if stream else [])]) == 0

"""A quote's token and a sign-in's nonce bind an amount (or a sign-in) to one request until they
expire; anything else a client sends for them is refused with a 402, never an error."""

from __future__ import annotations

import time

import pytest

from tollway.errors import PaymentInvalid
from tollway.quotes import QuoteSigner

SIGNER = QuoteSigner("a secret")
NOW = int(time.time())


def test_a_quote_token_pays_its_own_request_amount_and_cap_until_it_expires():
    token = SIGNER.token("d1", 100, NOW + 60, 512)
    SIGNER.check(token, "d1", 100, NOW, 512)
    for digest, amount, cap, code in (
        ("d2", 100, 512, "quote_mismatch"),
        ("d1", 99, 512, "quote_mismatch"),
        ("d1", 100, 4096, "quote_mismatch"),
    ):
        with pytest.raises(PaymentInvalid) as refused:
            SIGNER.check(token, digest, amount, NOW, cap)
        assert refused.value.code == code
    with pytest.raises(PaymentInvalid) as refused:
        SIGNER.check(token, "d1", 100, NOW + 61, 512)
    assert refused.value.code == "quote_expired"


@pytest.mark.parametrize("token", [None, 5, "no dot", "1" * 5000 + ".x", "١٢٣." + "0" * 64, "123.é", ".", "-1.x"])
def test_a_malformed_quote_token_is_refused(token):
    with pytest.raises(PaymentInvalid):
        SIGNER.check(token, "d1", 100, NOW, 512)


def test_a_sign_in_nonce_is_for_its_own_request_until_it_expires():
    nonce = SIGNER.nonce("d1", NOW + 60)
    assert SIGNER.check_nonce(nonce, "d1", NOW)
    assert not SIGNER.check_nonce(nonce, "d2", NOW)
    assert not SIGNER.check_nonce(nonce, "d1", NOW + 61)
    for forged in (nonce[:-1] + "é", "é" * 40, "", "f" * 5000, nonce.upper()):
        assert not SIGNER.check_nonce(forged, "d1", NOW)

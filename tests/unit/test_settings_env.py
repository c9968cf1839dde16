"""Settings from the environment: ``TOLLWAY_X_FILE`` reads ``X`` from a file, except where
``X_FILE`` is a setting of its own."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tollway.config import Settings


@pytest.fixture(autouse=True)
def nothing_else_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tollway.toml here
    for name in [k for k in os.environ if k.startswith("TOLLWAY_")]:
        monkeypatch.delenv(name)


def test_a_file_variable_reads_its_setting_from_the_file(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("an-operator-token-from-a-file\n")
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    assert Settings().admin_token == "an-operator-token-from-a-file"


def test_a_setting_whose_name_ends_in_file_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TOLLWAY_DEVNET_FILE", str(tmp_path / "devnet.json"))  # (it need not exist)
    assert Settings().devnet_file == tmp_path / "devnet.json"


def test_a_setting_and_its_file_both_set_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("an-operator-token-from-a-file\n")
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", "an-operator-token-in-the-env")
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ValueError, match="keep one"):
        Settings()


def test_a_withdrawal_delay_the_claimer_cannot_beat_is_refused():
    """Every voucher is claimed before a payer's withdrawal can finish: a delay shorter than twice the
    watch, the longest call and the settlement margin would let a payer take back what was charged."""
    with pytest.raises(ValueError, match="withdraw_delay_seconds"):
        Settings(max_call_seconds=3600, channels={"withdraw_delay_seconds": 900, "watch_seconds": 30})
    with pytest.raises(ValueError, match="withdraw_delay_seconds"):
        Settings(channels={"withdraw_delay_seconds": 900, "watch_seconds": 3600})
    assert Settings(channels={"withdraw_delay_seconds": 900}).channels.watch_seconds == 30  # (the defaults fit)
    no_channels = Settings(schemes=["exact"], max_call_seconds=3600, channels={"withdraw_delay_seconds": 900})
    assert no_channels.max_call_seconds == 3600


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("admin_token", "Q7f<9zLmW2pR4tYx8vB1nK3s"),  # (a generated secret with a "<" is no placeholder)
        ("quote_secret", "sk-or-v1-abc...defSECRET-0123"),
    ],
)
def test_a_secret_with_symbols_is_taken_and_a_refused_value_is_not_echoed(field, value, monkeypatch):
    assert getattr(Settings(**{field: value}), field) == value
    secret_url = "wss://rpc.example.com/v2/SECRET-KEY-0123456789"
    with pytest.raises(ValidationError) as refused:
        Settings(chain={"rpc_url": secret_url, "payee": "0xSECRET-PRIVATE-KEY-PASTED-AS-PAYEE"})
    said = [e["msg"] for e in refused.value.errors()]  # (what `tollway serve` and `doctor` print)
    assert len(said) == 2 and not [m for m in said if "SECRET" in m], said


def test_public_url_has_its_scheme_and_host_in_lower_case_and_its_path_as_written():
    """(The origin a signed message must name is compared in lower case.)"""
    assert Settings(public_url="HTTPS://Tollway.Example:8443/Pay/").public_url == "https://tollway.example:8443/Pay/"
    assert Settings(public_url="https://[2001:DB8::1]").public_url == "https://[2001:db8::1]"


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("TOLLWAY_CHAIN__NATIVE_USD", "-3000"),  # (the least on-chain payment would pay no gas)
        ("TOLLWAY_MIN_CHAIN_PAYMENT_USD", "-1"),
        ("TOLLWAY_CHAIN__PRIORITY_FEE_GWEI", "-1"),  # (every settlement refused by the node: the outbox wedged)
        ("TOLLWAY_CHAIN__MAX_FEE_GWEI", "0"),
        ("TOLLWAY_CHAIN__FEE_CEILING_GWEI", "-5"),
        ("TOLLWAY_CHAIN__SETTLE_GAS_LIMIT", "1000"),
        ("TOLLWAY_IMAGE_TOKEN_ALLOWANCE", "-2500"),  # (an image would lower a call's price)
        ("TOLLWAY_QUOTE_TTL_SECONDS", "0"),  # (no quote could be paid)
        ("TOLLWAY_MAX_BODY_BYTES", "-1"),
        ("TOLLWAY_RECHECK_AFTER_SECONDS", "-1"),
        ("TOLLWAY_STICKY_IDLE_SECONDS", "-1"),
        ("TOLLWAY_FAILURE_COOLDOWN_SECONDS", "-1"),
        ("TOLLWAY_CACHE_MEMORY_SECONDS", "-1"),
        ("TOLLWAY_PORT", "70000"),
        ("TOLLWAY_UPSTREAM__READ_TIMEOUT", "0"),
        ("TOLLWAY_UPSTREAM__CONNECT_TIMEOUT", "-1"),
        ("TOLLWAY_UPSTREAM__MAX_CONNECTIONS", "0"),
        ("TOLLWAY_UPSTREAM__PAY_MAX_USD_PER_CALL", "-1"),
        ("TOLLWAY_UPSTREAM__PAY_MAX_USD_TOTAL", "-1"),
    ],
)
def test_a_number_out_of_its_range_is_refused_at_start_naming_the_setting(env, value, monkeypatch):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    (error,) = refused.value.errors()
    assert error["loc"][-1] == env.removeprefix("TOLLWAY_").split("__")[-1].lower()

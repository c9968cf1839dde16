"""A call's receipt: what it was quoted, paid and charged, how its payment settled, its usage."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .gateway import Gateway
from .pricing import money
from .upstream.attempts import decode_attempts


def view(gw: Gateway, row: dict[str, Any]) -> dict[str, Any]:
    """The receipt document of a call (a row of ``Store.receipt``)."""
    decimals = gw.settings.chain.decimals
    return {
        "id": row["id"],
        "model": row["model"],
        "upstream_model": row["upstream_model"],
        "api": row["api"],
        "upstream": row["upstream"],
        "stream": row["stream"],
        "status": row["status"],
        "error": row["error"],
        "quote": money(row["quote"], decimals),
        "paid": money(row["paid"], decimals),
        "from_credit": money(row["from_credit"], decimals),
        "cost": money(row["cost"], decimals),
        "credit_after": money(row["credit_after"], decimals),
        "cache_discount": money(row["cache_discount"], decimals),
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cached_tokens": row["cached_tokens"],
            "cache_write_tokens": row["cache_write_tokens"],
            "expected_cached_tokens": row["expected_cached_tokens"],
            "dialect": row["usage_dialect"],
            "upstream_cost_usd": row["upstream_cost"],
        },
        "payment": {
            "state": row["payment_state"],
            "scheme": row["scheme"],
            "network": row["network"],
            "asset": row["asset"],
            "payer": row["payer"],
            "payee": row["payee"],
            "amount": money(row["amount"], decimals),
            "transaction": row["tx_hash"],
            "error": row["payment_error"],
        },
        # every upstream tried, in order (a failure before the first byte moves on to the next)
        "attempts": [
            {"upstream": a.upstream, "model": a.model or row["model"], "outcome": a.outcome, "ms": a.ms}
            for a in decode_attempts(row["attempts"])
        ],
        "upstream_latency_ms": row["upstream_latency_ms"],
        "duration_ms": row["duration_ms"],
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
    }


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")

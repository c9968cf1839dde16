"""The upstreams a call tried, as the receipt shows them and live stats count them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..jsonbytes import compact


@dataclass(frozen=True)
class Attempt:
    """One upstream tried for a call: ``outcome`` is "served", or the code of the error that
    failed it before the first byte; ``ms`` how long it took to answer or fail; ``model`` the
    model it was asked for (a ``models`` fallback list tries several)."""

    upstream: str
    outcome: str
    ms: float
    model: str | None = None

    @property
    def served(self) -> bool:
        return self.outcome == "served"


def encode_attempts(attempts: Sequence[Attempt]) -> str | None:
    """How a call's attempts are kept in the ledger: ``[[upstream, outcome, ms, model], ...]``."""
    return compact([[a.upstream, a.outcome, round(a.ms, 1), a.model] for a in attempts]) if attempts else None


def decode_attempts(text: str | None) -> list[Attempt]:
    return [Attempt(str(a[0]), str(a[1]), float(a[2]), *a[3:4]) for a in json.loads(text)] if text else []

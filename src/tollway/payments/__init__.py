"""Payment schemes (one module each), the x402 wire codec and chain access.

``SCHEMES`` is the registry: a scheme name → the factory that builds it from settings. Factories
are imported lazily, so a scheme's dependencies load only when it is enabled.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Context, PaymentScheme

SCHEMES: dict[str, str] = {
    "upto": "tollway.payments.upto:from_settings",
    "exact": "tollway.payments.exact:from_settings",
    "credit": "tollway.payments.credit:from_settings",
    "transfer": "tollway.payments.transfer:from_settings",
    "batch-settlement": "tollway.payments.batch:from_settings",
    "mpp-permit2": "tollway.payments.permit2_charge:from_settings",
    "mpp-hash": "tollway.payments.transfer:hash_from_settings",
}

# The schemes whose money moved before the call (a transfer; credit and the free tier move none):
# a call of theirs that is not served leaves its payment settled, its amount as credit.
PREPAID = frozenset({"credit", "transfer", "mpp-hash", "free"})


def build_scheme(name: str, ctx: Context) -> PaymentScheme:
    try:
        target = SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown payment scheme {name!r}; known: {', '.join(SCHEMES)}") from None
    module, factory = target.split(":")
    return getattr(importlib.import_module(module), factory)(ctx)  # type: ignore[no-any-return]

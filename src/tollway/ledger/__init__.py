"""The ledger: SQLModel tables (``models``) and the only module that speaks SQL (``store``)."""

from .models import Call, Payment, PaymentState
from .store import Store

__all__ = ["Call", "Payment", "PaymentState", "Store"]

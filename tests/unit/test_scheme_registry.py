"""The payment schemes' registry agrees with the schemes themselves."""

from __future__ import annotations

import importlib

from tollway.free_tier import FreeScheme
from tollway.payments import PREPAID, SCHEMES


def scheme_classes() -> list[type]:
    """Every scheme class: each registered factory's module's classes with a ``name``, and the free tier's."""
    found: dict[str, type] = {"free": FreeScheme}
    for target in SCHEMES.values():
        module = importlib.import_module(target.split(":")[0])
        for value in vars(module).values():
            if isinstance(value, type) and isinstance(getattr(value, "name", None), str) and value.name in SCHEMES:
                found[value.name] = value
    return list(found.values())


def test_every_registered_scheme_has_a_class():
    assert {c.name for c in scheme_classes()} == {*SCHEMES, "free"}


def test_prepaid_names_the_schemes_whose_money_moved_before_the_call():
    """``PREPAID`` is what a stopped gateway's abandoned payments are given back by (a scheme no
    longer configured included): it must say what each scheme's own ``prepaid`` says."""
    assert {c.name for c in scheme_classes() if c.prepaid} == PREPAID

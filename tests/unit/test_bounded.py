"""``Recently``: a memory of what was found moments ago (``Gateway.codeless``, fed by sign-ins
anyone may send; payers short of funds) that stays bounded, and cheap, whatever is added to it."""

from __future__ import annotations

import time

from tollway.bounded import Recently


def test_a_key_is_remembered_for_its_seconds():
    memory = Recently(60.0)
    memory.add("0xabc")
    assert "0xabc" in memory and "0xdef" not in memory
    memory.add("0xold", now=time.monotonic() - 61)
    assert "0xold" not in memory


def test_past_its_bound_the_oldest_are_let_go():
    """Every key fresh (a stranger's sign-ins, a minute's worth): the memory never holds more than
    ``most`` (it grew without end, and went over all it held at each add, on the event loop)."""
    memory = Recently(60.0, most=100)
    for n in range(300):
        memory.add(f"0x{n:040x}")
        assert len(memory._until) <= memory.most
    assert f"0x{299:040x}" in memory and f"0x{0:040x}" not in memory


def test_a_key_added_again_is_kept_as_the_newest_and_the_expired_go_first():
    memory = Recently(60.0, most=3)
    now = time.monotonic()
    memory.add("a", now=now - 100)  # (expired)
    for key in ("b", "c", "b", "d"):
        memory.add(key, now=now)
    assert list(memory._until) == ["c", "b", "d"]  # ("a" expired; "b" added again: newer than "c")
    memory.add("e", now=now)
    assert list(memory._until) == ["b", "d", "e"] and "c" not in memory

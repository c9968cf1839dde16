"""tollway.keccak: Keccak-256 (Ethereum's, not NIST SHA3-256), from safe-pysha3's C extension where
the dependency's marker installs it."""

from __future__ import annotations

import hashlib
import os
import platform
import sys

from eth_hash.backends.pycryptodome import CryptodomeBackend

from tollway.keccak import keccak


def test_known_digests():
    assert keccak(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keccak(b"transfer(address,uint256)")[:4].hex() == "a9059cbb"  # the ERC-20 selector
    assert keccak(b"") != hashlib.sha3_256(b"").digest()  # (the padding differs from NIST's)


def test_agrees_with_eth_hash_on_every_length_around_the_rate():
    reference = CryptodomeBackend()
    for n in [*range(0, 300), 1 << 16]:  # (136 bytes is Keccak-256's block)
        data = os.urandom(n)
        assert keccak(data) == reference.keccak256(data), n


def test_the_c_extension_is_used_where_the_dependency_installs_it():
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
        assert keccak.__module__ == "tollway.keccak", "safe-pysha3 is not installed: eth-hash's slower default runs"

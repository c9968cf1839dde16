"""Keccak-256, the hash of every Ethereum signature and id tollway checks or makes.

From safe-pysha3's C extension where it is installed (Linux on x86-64 and ARM64: the ``pysha3``
backend of eth-hash), else eth-hash's default. eth-hash picks pycryptodome first when both are
there, and pycryptodome makes several ctypes calls and objects per hash: 12 µs for 200 bytes against
1.7 µs, and a paid call hashes two (a sign-in) to six times (an ``exact`` payment and its settlement).
"""

from __future__ import annotations

try:
    from sha3 import keccak_256
except ImportError:  # (no wheel for this platform)
    from eth_hash.auto import keccak as keccak
else:

    def keccak(data: bytes) -> bytes:
        return keccak_256(data).digest()


__all__ = ["keccak"]

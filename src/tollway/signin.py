"""Who a request comes from: Sign-In-With-X (x402's ``sign-in-with-x`` extension: CAIP-122, an
EIP-4361 message signed with EIP-191 — or EIP-1271 by a contract wallet).

Every 402 (and the 401 of the endpoints that need a wallet) declares a sign-in whose nonce is
bound to the very request it answers: an HMAC over the request's digest and an expiry, with the
quote secret — so any replica can check it without state, and a captured sign-in works for
nothing but that request until it expires. A sign-in that pays (a call its credit covers, a
withdrawal) spends its nonce as the charge's unique key: it works once.

``X-Tollway-Wallet`` (tollway's earlier EIP-712 wallet proof) still identifies a wallet for one
release; answers to it carry a ``Deprecation`` header.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from eth_abi import encode as abi_encode
from starlette.requests import Request

from . import siwe
from .errors import Forbidden, GatewayError, PaymentInvalid, PaymentMalformed, Unauthorized
from .jsonbytes import dumps
from .keccak import keccak
from .payments import x402
from .payments.chain import RpcError
from .payments.credit import check_wallet_proof
from .quotes import request_digest

KEY = "sign-in-with-x"  # the extension, and the header that answers it
LEGACY_HEADER = "x-tollway-wallet"
DEPRECATION = "@1796083200"  # RFC 9745: X-Tollway-Wallet deprecated as of 2026-12-01
SPEC = "https://github.com/coinbase/x402/blob/main/specs/extensions/sign-in-with-x.md"
STATEMENT = "Sign in to this tollway gateway: calls your credit covers are served without a payment."
MAX_AGE = 300  # seconds a sign-in may be old (the x402 SDKs' default)
CLOCK_SKEW = 5
MAX_HEADER = 4096
ERC1271 = keccak(b"isValidSignature(bytes32,bytes)")[:4]
ERC1271_MAGIC = ERC1271 + bytes(28)  # what a contract wallet answers for a signature it accepts (a bytes4 word)
# How nodes word a call that failed in the EVM rather than in the node (anvil and reth: "EVM error
# OutOfGas"; geth: "invalid opcode: INVALID", "out of gas", "precompiled contract failed").
EVM_FAILURE = re.compile(
    r"EVM error|invalid opcode|out of gas|precompile|stack (?:underflow|overflow)|invalid jump", re.IGNORECASE
)
HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
HEX_SIGNATURE = re.compile(r"^0x(?:[0-9a-fA-F]{2}){65,}\Z")  # (65 bytes, or more for a contract wallet)


@dataclass(frozen=True)
class SignIn:
    wallet: str  # lower-case address
    nonce: str  # the request-bound nonce; a payment by sign-in spends it (None: the legacy header)
    legacy: bool = False


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_key(request: Request, body: Any = None) -> str:
    """The digest a sign-in for a request other than a chat call is bound to: method, path and body."""
    return request_digest({"method": request.method, "path": request.url.path, "body": body})


def declaration(gw: Any, request: Request, digest: str) -> dict[str, Any]:
    """``extensions["sign-in-with-x"]`` for an answer to ``request`` (whose digest is ``digest``)."""
    now = time.time()
    expires = int(now) + gw.settings.quote_ttl_seconds
    base = gw.public_base(request)
    uri = base + request.url.path
    return {
        KEY: {
            "info": {
                "domain": urlsplit(base).netloc,
                "uri": uri,
                "version": "1",
                "nonce": gw.quotes.nonce(digest, expires),
                "issuedAt": iso(int(now)),
                "expirationTime": iso(expires),
                "statement": STATEMENT,
                "resources": [uri],
            },
            "supportedChains": [{"chainId": gw.network, "type": "eip191"}],
        }
    }


async def identify(gw: Any, request: Request, digest: str) -> SignIn | None:
    """The wallet a request signs in as, or None if it says nothing. A ``SIGN-IN-WITH-X`` header
    that is malformed is a 400; one that is not valid for this gateway, this request and now is
    refused (402 ``invalid_siwx_*``). ``X-Tollway-Wallet`` is read when no sign-in is sent."""
    raw = request.headers.get(KEY)
    if raw is None:
        legacy = request.headers.get(LEGACY_HEADER)
        if not legacy:
            return None
        doc = x402.unb64json(legacy)
        wallet = check_wallet_proof(doc, gw.chain_id, gw.token, int(time.time()), gw.origin(request))
        return SignIn(wallet, "", legacy=True)
    if len(raw) > MAX_HEADER:
        raise PaymentMalformed("SIGN-IN-WITH-X is too large", code="invalid_siwx_payload")
    doc = x402.unb64json(raw)
    fields = _fields(doc)
    _check(gw, request, fields, digest, time.time())
    wallet = fields["address"].lower()
    if not await _signed_by(gw, fields, wallet):
        raise PaymentInvalid("the sign-in is not signed by its address", code="invalid_siwx_signature")
    return SignIn(wallet, fields["nonce"])


STRINGS = ("domain", "address", "uri", "version", "chainId", "type", "nonce", "issuedAt", "signature")
OPTIONAL = ("statement", "expirationTime", "notBefore", "requestId")


def _fields(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise PaymentMalformed("SIGN-IN-WITH-X must be a JSON object", code="invalid_siwx_payload")
    for name in STRINGS:
        if not isinstance(doc.get(name), str) or not doc[name] or "\n" in doc[name]:
            raise PaymentMalformed(f"SIGN-IN-WITH-X.{name} is missing or malformed", code="invalid_siwx_payload")
    for name in OPTIONAL:
        if doc.get(name) is not None and (not isinstance(doc[name], str) or "\n" in doc[name]):
            raise PaymentMalformed(f"SIGN-IN-WITH-X.{name} is malformed", code="invalid_siwx_payload")
    resources = doc.get("resources")
    if resources is not None and not (
        isinstance(resources, list) and all(isinstance(r, str) and "\n" not in r for r in resources)
    ):
        raise PaymentMalformed("SIGN-IN-WITH-X.resources is malformed", code="invalid_siwx_payload")
    if not HEX_ADDRESS.match(doc["address"]) or not HEX_SIGNATURE.match(doc["signature"]):
        raise PaymentMalformed("SIGN-IN-WITH-X address or signature is malformed", code="invalid_siwx_payload")
    try:
        dumps(doc)  # (what is signed is its text in UTF-8: a lone surrogate has none)
    except ValueError:
        raise PaymentMalformed("SIGN-IN-WITH-X is not valid UTF-8 text", code="invalid_siwx_payload") from None
    return doc


def _time(value: str, name: str) -> float:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PaymentInvalid(f"SIGN-IN-WITH-X.{name} is not an ISO 8601 time", code=f"invalid_siwx_{name}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _check(gw: Any, request: Request, f: dict[str, Any], digest: str, now: float) -> None:
    base = gw.public_base(request)
    try:
        uri = urlsplit(f["uri"])
    except ValueError:  # (an unbalanced "[" of an IPv6 host, say)
        raise PaymentInvalid("SIGN-IN-WITH-X.uri is not a URI", code="invalid_siwx_uri_mismatch") from None
    checks = (
        (f["domain"] == urlsplit(base).netloc, "the sign-in names another domain", "invalid_siwx_domain_mismatch"),
        (
            f"{uri.scheme}://{uri.netloc}" == gw.origin(request),
            "the sign-in is for another URI",
            "invalid_siwx_uri_mismatch",
        ),
        (f["version"] == "1", "sign-in version must be 1", "invalid_siwx_version"),
        (f["chainId"] == gw.network, f"the sign-in must be on {gw.network}", "invalid_siwx_chain_id"),
        (f["type"] == "eip191", "this gateway verifies eip191 sign-ins", "invalid_siwx_unsupported_chain"),
    )
    for ok, message, code in checks:
        if not ok:
            raise PaymentInvalid(message, code=code)
    issued = _time(f["issuedAt"], "issued_at")
    if issued > now + CLOCK_SKEW:
        raise PaymentInvalid("the sign-in was issued in the future", code="invalid_siwx_issued_at_in_future")
    if now - issued > MAX_AGE:
        raise PaymentInvalid(f"the sign-in is older than {MAX_AGE} s", code="invalid_siwx_issued_at_too_old")
    if f.get("expirationTime") and _time(f["expirationTime"], "expiration_time") < now:
        raise PaymentInvalid("the sign-in has expired", code="invalid_siwx_expired")
    if f.get("notBefore") and _time(f["notBefore"], "not_before") > now + CLOCK_SKEW:
        raise PaymentInvalid("the sign-in is not valid yet", code="invalid_siwx_not_yet_valid")
    if not gw.quotes.check_nonce(f["nonce"], digest, int(now)):
        raise PaymentInvalid(
            "the sign-in's nonce was issued for another request, or has expired: sign the one this answer carries",
            code="invalid_siwx_nonce",
        )


async def _signed_by(gw: Any, f: dict[str, Any], wallet: str) -> bool:
    """EIP-191 by the address itself; else, if the address is a contract, its EIP-1271 answer. An
    address with no code (a key's, a precompile's) is not asked; a contract whose code fails —
    reverts, or any other failure of the EVM the node reports — did not sign."""
    if siwe.recover(f) == wallet:
        return True
    if wallet in gw.codeless:  # (found moments ago: no contract wallet to ask)
        return False
    signature = bytes.fromhex(f["signature"][2:])
    call = ERC1271 + abi_encode(["bytes32", "bytes"], [siwe.eip191_hash(siwe.message(f)), signature])
    code, answer = await gw.chain.batch(  # (one round trip: the code, and what it answers)
        [("eth_getCode", [wallet, "latest"]), ("eth_call", [{"to": wallet, "data": "0x" + call.hex()}, "latest"])],
        errors=True,
    )
    if isinstance(code, RpcError):
        raise code  # the RPC failed (503), not the wallet
    if str(code) in ("0x", ""):
        gw.codeless.add(wallet)
        return False
    if isinstance(answer, RpcError):
        if answer.revert_reason is None and not EVM_FAILURE.search(answer.message):
            raise answer  # (as above)
        return False
    return str(answer).lower() == "0x" + ERC1271_MAGIC.hex()  # (exactly: one echoing its input must not pass)


def unauthorized(gw: Any, request: Request, digest: str, message: str, code: str) -> Unauthorized:
    """A 401 for an endpoint that needs a wallet, carrying a sign-in for this request (in an x402
    ``PAYMENT-REQUIRED`` with no offers, as x402's auth-only answers do, and in the body)."""
    exc = Unauthorized(message, code=code)
    exc.challenge = challenge(gw, request, digest, exc)
    return exc


def challenge(gw: Any, request: Request, digest: str, exc: GatewayError) -> dict[str, Any]:
    """What an answer carries for its client to sign in for ``request`` (an x402
    ``PAYMENT-REQUIRED`` with no offers, as x402's auth-only answers do, and the body's
    ``extensions``)."""
    declared = declaration(gw, request, digest)
    resource = {"url": gw.public_base(request) + request.url.path, "description": "sign in", "mimeType": ""}
    doc = x402.payment_required(f"{exc.code}: {exc.message}", resource, [], declared)
    return {
        "headers": {x402.PAYMENT_REQUIRED: x402.b64json(doc), "www-authenticate": f'SIWX realm="{gw.origin(request)}"'},
        "body": {**exc.body(), "extensions": declared},
    }


async def require(gw: Any, request: Request, digest: str) -> SignIn:
    """The wallet a request signs in as; a 401 with a sign-in to sign when it does not, or cannot."""
    try:
        who = await identify(gw, request, digest)
    except (PaymentInvalid, PaymentMalformed) as exc:
        raise unauthorized(gw, request, digest, exc.message, exc.code) from None
    if who is None:
        raise unauthorized(
            gw,
            request,
            digest,
            "sign in with the wallet (SIGN-IN-WITH-X): sign the sign-in this answer carries",
            "sign_in_required",
        )
    return who


async def require_owner(gw: Any, request: Request, owner: str | None, thing: str) -> None:
    """The request signs in as ``owner``'s wallet: a 401 (see ``require``) if it does not sign in,
    403 ``<thing>_forbidden`` if it is another wallet. ``owner`` None (there is no such thing): any
    wallet signed in may learn that, and no one else."""
    who = await require(gw, request, request_key(request))
    if owner is not None and owner.lower() != who.wallet:
        raise Forbidden(f"this {thing} belongs to another wallet", code=f"{thing}_forbidden")

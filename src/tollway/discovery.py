"""How agents find a tollway: the x402 ``bazaar`` discovery extension every 402 declares.

It is x402's own discovery path: a client echoes a 402's extensions in its payment, and a
facilitator that settles it may catalogue the resource from the declaration — the request it takes
(a JSON body: an OpenAI chat request), an example of the answer, and a JSON schema of both, which
the facilitator validates the declaration against (the official SDK's
``x402.extensions.bazaar.facilitator.extract_discovery_info`` does; the tests run it).
"""

from __future__ import annotations

from typing import Any

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "input": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "const": "http"},
                "method": {"type": "string", "enum": ["POST"]},
                "bodyType": {"type": "string", "enum": ["json"]},
                "body": {
                    "type": "object",
                    "properties": {"model": {"type": "string"}, "messages": {"type": "array"}},
                    "required": ["model", "messages"],
                },
            },
            "required": ["type", "method", "bodyType", "body"],
        },
        "output": {
            "type": "object",
            "properties": {"type": {"type": "string"}, "example": {"type": "object"}},
            "required": ["type"],
        },
    },
    "required": ["input"],
}
ANSWER = {  # (what an answer looks like: the completion, and usage.cost — what the call was charged, in USD)
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "cost": 0.00002},
}


def bazaar(model: str) -> dict[str, Any]:
    """The ``bazaar`` extension a 402 for a chat completion with ``model`` declares."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    info = {
        "input": {"type": "http", "method": "POST", "bodyType": "json", "body": body},
        "output": {"type": "json", "example": ANSWER},
    }
    return {"bazaar": {"info": info, "schema": SCHEMA}}

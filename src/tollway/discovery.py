"""How agents find a tollway: the x402 ``bazaar`` discovery extension every 402 declares,
``/openapi.json`` with MPP's discovery annotations, and ``/llms.txt``.

It is x402's own discovery path: a client echoes a 402's extensions in its payment, and a
facilitator that settles it may catalogue the resource from the declaration — the request it takes
(a JSON body in the API's own shape), an example of the answer, and a JSON schema of both, which
the facilitator validates the declaration against (the official SDK's
``x402.extensions.bazaar.facilitator.extract_discovery_info`` does; the tests run it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .gateway import Gateway


def schema(prompt: str) -> dict[str, Any]:
    """The JSON schema of a declaration whose request carries its prompt in ``prompt``."""
    return {
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
                        "properties": {"model": {"type": "string"}},
                        "required": ["model", prompt],
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


HELLO = [{"role": "user", "content": "Hello"}]
# Per API: an example request (but its model) and answer. Chat's and embeddings' usage.cost is what
# the call was charged, in USD; the Messages and Responses answers come back as their upstream sent them.
EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "chat": (
        {"messages": HELLO},
        {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "cost": 0.00002},
        },
    ),
    "embeddings": (
        {"input": "Hello"},
        {"object": "list", "data": [{"index": 0, "embedding": [0.01, -0.02]}], "usage": {"prompt_tokens": 1}},
    ),
    "messages": (
        {"max_tokens": 256, "messages": HELLO},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "Hello!"}],
            "usage": {"input_tokens": 9, "output_tokens": 3},
        },
    ),
    "responses": (
        {"input": "Hello"},
        {
            "object": "response",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]}],
            "usage": {"input_tokens": 9, "output_tokens": 3},
        },
    ),
}


def bazaar(model: str, surface: str = "chat") -> dict[str, Any]:
    """The ``bazaar`` extension a 402 for a request of ``surface`` (an API) with ``model`` declares."""
    body, answer = EXAMPLES[surface]
    info = {
        "input": {"type": "http", "method": "POST", "bodyType": "json", "body": {"model": model, **body}},
        "output": {"type": "json", "example": answer},
    }
    prompt = "messages" if "messages" in body else "input"
    return {"bazaar": {"info": info, "schema": schema(prompt)}}


def openapi(gw: Gateway, base: str) -> dict[str, Any]:
    """``GET /openapi.json``: the API as OpenAPI 3.1, its payable operation annotated as MPP's
    service discovery draft (draft-payment-discovery) says — ``x-service-info`` and, per payable
    operation, ``x-payment-info`` offers and a ``402`` response. Prices depend on the request, so an
    offer's ``amount`` is null: the 402's quote is authoritative."""
    x402 = sorted(s.name for s in gw.schemes if "x402" in s.rails)
    offers: list[dict[str, Any]] = (
        [
            {
                "intent": "charge",
                "method": "evm",
                "amount": None,
                "currency": gw.token,
                "description": f"priced per request (the 402 quotes an upper bound); chain {gw.chain_id}",
            }
        ]
        if gw.mpp is not None
        else []
    )
    chat = {
        "summary": "Chat completions (OpenAI-compatible), paid per call",
        "description": f"Unpaid: 402 with an x402 quote ({', '.join(x402)}) and an MPP challenge. The answer's "
        "usage.cost is what the call was charged, in USD.",
        "x-payment-info": {"offers": offers},
        "requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_REQUEST}}},
        "responses": {
            "200": {
                "description": "The completion (or an SSE stream)",
                "content": {"application/json": {"schema": CHAT_ANSWER}},
            },
            "402": {"description": "Payment Required"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tollway", "version": __version__, "description": "A pay-per-call gateway for LLMs"},
        "servers": [{"url": base}],
        "x-service-info": {"categories": ["compute"], "docs": {"llms": base + "/llms.txt"}},
        "paths": {
            "/v1/chat/completions": {"post": chat},
            "/v1/embeddings": {
                "post": {
                    **chat,
                    "summary": "Embeddings (OpenAI-compatible), paid per call",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": EMBEDDINGS_REQUEST}}},
                    "responses": {"200": {"description": "The embeddings"}, "402": {"description": "Payment Required"}},
                }
            },
            "/v1/messages": {
                "post": {
                    **chat,
                    "summary": "Anthropic Messages (forwarded untranslated: cache_control survives), paid per call",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": MESSAGES_REQUEST}}},
                    "responses": {
                        "200": {"description": "The message (or an SSE stream of Anthropic's events)"},
                        "402": {"description": "Payment Required"},
                    },
                }
            },
            "/v1/responses": {
                "post": {
                    **chat,
                    "summary": "OpenAI Responses (forwarded untranslated), paid per call",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": RESPONSES_REQUEST}}},
                    "responses": {
                        "200": {"description": "The response (or an SSE stream of its events)"},
                        "402": {"description": "Payment Required"},
                    },
                }
            },
            "/v1/models": {
                "get": {"summary": "Models and their prices", "responses": {"200": {"description": "The models"}}}
            },
            "/v1/models/{model}/endpoints": {
                "get": {
                    "summary": "A model's upstreams with their prices and live figures (uptime, latency, throughput)",
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The endpoints"}, "404": {"description": "No such model"}},
                }
            },
            "/v1/rankings": {
                "get": {
                    "summary": "Usage share by model over the last day and week",
                    "parameters": [
                        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}}
                    ],
                    "responses": {"200": {"description": "The rankings"}},
                }
            },
        },
    }


CHAT_REQUEST = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}}}},
        "max_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
    },
    "required": ["model", "messages"],
}
MESSAGES_REQUEST = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "system": {"type": ["string", "array"]},
        "messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}}}},
        "max_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
    },
    "required": ["model", "messages"],
}
RESPONSES_REQUEST = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "instructions": {"type": "string"},
        "input": {"type": ["string", "array"]},
        "max_output_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
    },
    "required": ["model", "input"],
}
EMBEDDINGS_REQUEST = {
    "type": "object",
    "properties": {"model": {"type": "string"}, "input": {"type": ["string", "array"]}},
    "required": ["model", "input"],
}
CHAT_ANSWER = {
    "type": "object",
    "properties": {"choices": {"type": "array"}, "usage": {"type": "object"}},
    "required": ["choices"],
}


def llms_txt(gw: Gateway, base: str) -> str:
    """``GET /llms.txt`` (llmstxt.org): how an agent uses this gateway, in a page of Markdown."""
    models = ", ".join(sorted(gw.settings.models)) or "(none configured)"
    x402 = ", ".join(sorted(s.name for s in gw.schemes if "x402" in s.rails))
    return f"""# tollway

> A pay-per-call gateway for LLMs: no account, no API key — a wallet. An unpaid call gets HTTP 402 with a
> quote; retry with a signed payment (x402: {x402}; or MPP's Payment authentication, evm charge) and get
> the completion, what it cost (usage.cost, USD) and a receipt.

Chain: eip155:{gw.chain_id}. Asset: {gw.token}. Models: {models}.

## API

- [OpenAPI](/openapi.json): the operations, their inputs and outputs, and their payment offers
- POST {base}/v1/chat/completions: OpenAI-compatible chat completions (streaming too), paid per call
- POST {base}/v1/embeddings: OpenAI-compatible embeddings, paid per call
- POST {base}/v1/messages: Anthropic Messages (the Anthropic SDK works with base_url {base}), paid per call
- POST {base}/v1/responses: OpenAI Responses, paid per call (send the whole input: no previous_response_id)
- GET {base}/v1/models: the models and their prices
- GET {base}/v1/models/<model>/endpoints: its upstreams, with uptime, latency and throughput (live)
- GET {base}/v1/rankings: usage share by model, last day and week (?format=csv)

Routing follows OpenRouter's request fields: `provider` (order, only, ignore, allow_fallbacks, sort:
price|latency|throughput, max_price in USD per million tokens) and the `:nitro` / `:floor` model variants.
- GET {base}/v1/channels/refund: a batch-settlement channel's unclaimed rest, refunded
"""

"""The other generation APIs tollway forwards untranslated: Anthropic's Messages (``POST
/v1/messages``) and OpenAI's Responses (``POST /v1/responses``). Each is priced like a chat
completion (``chat.parse_generation``) from its own prompt and output-cap field; what differs is
where the prompt is and what each must refuse because its quote could not bound it:

- **Messages**: the prompt is ``system`` + ``messages``; the cap is ``max_tokens`` (added when the
  request has none: Anthropic requires it; thinking counts within it). Refused: server-side and
  Anthropic-defined tools (billed per use, or carrying hidden prompts of their own), MCP servers,
  containers, documents (a PDF's pages are priced as images the body's bytes do not bound).
- **Responses**: the prompt is ``instructions`` + ``input``; the cap is ``max_output_tokens``.
  Refused: context stored upstream (``previous_response_id``, ``conversation``, a stored
  ``prompt``, item references) — its tokens are not in the body —, background responses,
  server-side tools, files and audio.

A request with tools is allowed ``chat.TOOL_PROMPT_TOKENS`` more prompt in every API, chat's too.

Usage comes back in each API's own dialect (``usage.parse_usage``, ``usage.StreamUsage``).
"""

from __future__ import annotations

from typing import Any

from .chat import (
    ALLOWED_TIERS,
    Api,
    chat_messages,
    refuse_choice,
    refuse_fields,
    refuse_parts,
    refuse_tier,
    refuse_tools,
    tool_prompt,
)
from .errors import BadRequest

MESSAGES_PARTS = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")
MESSAGES_UNPRICED = {
    "mcp_servers": "remote MCP servers are billed by the upstream per use",
    "container": "code-execution containers are billed by the upstream per use",
}


def messages_prompt(body: dict[str, Any]) -> list[Any]:
    messages = chat_messages(body)
    system = body.get("system")
    if system is None:
        return messages
    if not isinstance(system, str | list):
        raise BadRequest("'system' must be a string or an array of text blocks", code="invalid_messages")
    return [{"role": "system", "content": system}, *messages]


def refuse_messages(body: dict[str, Any], items: list[Any]) -> None:
    refuse_fields(body, MESSAGES_UNPRICED)
    refuse_tier(body, ("auto", "standard_only"))
    refuse_choice(body, "inference_geo", ("global",), "inference in one region costs 1.1 times the list price")
    refuse_tools(body, (None, "custom"), "custom (client)")
    refuse_parts(items, MESSAGES_PARTS)


MESSAGES = Api(
    "messages",
    "/v1/messages",
    messages_prompt,
    refuse_messages,
    cap_field="max_tokens",
    prompt_allowance=tool_prompt,
)

STORED = "it refers to context stored upstream, which the price here cannot see: send the whole input"
RESPONSES_UNPRICED = {
    "previous_response_id": STORED,
    "conversation": STORED,
    "prompt": "a prompt template stored upstream is not priced here: send its text as instructions",
}
RESPONSES_ITEMS = (
    None,  # a message given by its role alone
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "reasoning",
)
RESPONSES_PARTS = ("input_text", "output_text", "refusal", "input_image", "summary_text", "reasoning_text")


def responses_prompt(body: dict[str, Any]) -> list[Any]:
    given = body.get("input")
    if isinstance(given, str) and given:
        items: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given and all(isinstance(i, dict) for i in given):
        items = given
    else:
        raise BadRequest("'input' must be a non-empty string or array of input items", code="invalid_input")
    instructions = body.get("instructions")
    if instructions is None:
        return items
    if not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string", code="invalid_input")
    return [{"role": "system", "content": instructions}, *items]


def refuse_responses(body: dict[str, Any], items: list[Any]) -> None:
    refuse_fields(body, RESPONSES_UNPRICED)
    if body.get("background"):
        raise BadRequest(
            "'background' is not accepted here: a background response is fetched later, after its payment",
            code="unpriced_parameter",
        )
    refuse_tier(body, ALLOWED_TIERS)
    refuse_tools(body, ("function", "custom"), "function and custom")
    for item in items:
        if item.get("type") not in RESPONSES_ITEMS:
            why = STORED if item.get("type") == "item_reference" else "its cost is not bounded here"
            raise BadRequest(
                f"input items of type {str(item.get('type'))[:40]!r} are not accepted here: {why}",
                code="unpriced_parameter",
            )
        if item.get("type") == "reasoning" and not (
            isinstance(item.get("encrypted_content"), str) and item["encrypted_content"]
        ):
            # (without it, the provider reads the reasoning it stored under the item's id)
            raise BadRequest(f"reasoning items need their encrypted_content: {STORED}", code="unpriced_parameter")
    refuse_parts(items, RESPONSES_PARTS)


# Anthropic's beta features that leave a call's price to what its body shows (a 1-hour cache write
# is priced by its cache_control mark); others (a 1M-token context at a higher rate, server-side
# tools) are refused rather than dropped without a word.
PRICED_BETAS = frozenset(
    {
        "prompt-caching-2024-07-31",
        "extended-cache-ttl-2025-04-11",
        "interleaved-thinking-2025-05-14",
        "fine-grained-tool-streaming-2025-05-14",
        "token-efficient-tools-2025-02-19",
        "output-128k-2025-02-19",
        "context-management-2025-06-27",
    }
)


def refuse_betas(header: str | None) -> None:
    """Refuse an ``anthropic-beta`` header that asks for a feature not priced here."""
    for beta in (b.strip() for b in (header or "").split(",")):
        if beta and beta not in PRICED_BETAS:
            raise BadRequest(
                f"anthropic-beta {beta[:60]!r} is not priced here (accepted: {', '.join(sorted(PRICED_BETAS))})",
                code="unpriced_parameter",
            )


RESPONSES = Api(
    "responses",
    "/v1/responses",
    responses_prompt,
    refuse_responses,
    cap_field="max_output_tokens",
    prompt_allowance=tool_prompt,
)

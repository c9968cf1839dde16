"""A real llama.cpp llama-server (tiny random-weight model) as an OpenAI-compatible upstream: what it reports
in `usage` and `timings`, including prompt-cache hits, with no gateway in between.

What llama-server (llama-cpp-python 0.3.36's llama.cpp) sends, as observed:
  * non-streaming: `usage` = {prompt_tokens, completion_tokens, total_tokens,
    prompt_tokens_details: {cached_tokens}} plus a llama.cpp-specific top-level `timings` = {cache_n,
    prompt_n, prompt_ms, predicted_n, predicted_ms, ...per_token_ms, ...per_second}. `prompt_tokens`
    counts the whole prompt (cached + evaluated): prompt_tokens == timings.cache_n + timings.prompt_n and
    cached_tokens == timings.cache_n.
  * streaming with stream_options.include_usage: the chunk with `finish_reason` has an empty delta and no
    usage; then one extra chunk with `choices: []` carries both `usage` and `timings`; then `[DONE]`.
    Without include_usage there is no usage chunk, and `timings` rides on the finish_reason chunk.
  * `model` in responses is the server's --alias, whatever the request asked for.
"""

from __future__ import annotations

import json
import time

import httpx

from llama import MODEL_ALIAS


def chat(base: str, messages: list[dict], **extra) -> dict:
    r = httpx.post(f"{base}/chat/completions", json={"messages": messages, "max_tokens": 8, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def prompt_tokens(base: str, messages: list[dict]) -> list[int]:
    """The exact token ids llama-server evaluates for these chat messages (template applied, BOS added)."""
    root = base.removesuffix("/v1")
    prompt = httpx.post(f"{root}/apply-template", json={"messages": messages}, timeout=10).json()["prompt"]
    r = httpx.post(f"{root}/tokenize", json={"content": prompt, "add_special": True}, timeout=10)
    return r.json()["tokens"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def long_system(tag: str) -> str:
    """A system message of ~300 tokens with the tiny model's tokenizer (about one token per word), starting
    with `tag` so that each test's prompts share no prefix with another test's."""
    rules = " ".join(f"Rule {i}: answer the question about the quick brown fox and the lazy dog." for i in range(14))
    return f"{tag}: you are a test assistant. {rules}"


def test_chat_completion_reports_usage(llama_upstream: str) -> None:
    t0 = time.monotonic()
    body = chat(llama_upstream, [{"role": "user", "content": "hello, tell me a short story"}], model="gpt-4o")
    elapsed = time.monotonic() - t0
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "cached_tokens" in usage["prompt_tokens_details"]
    timings = body["timings"]
    assert usage["prompt_tokens"] == timings["cache_n"] + timings["prompt_n"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"]
    assert body["model"] == MODEL_ALIAS
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert elapsed < 10


def test_shared_prefix_is_served_from_the_prompt_cache(llama_upstream: str) -> None:
    system = long_system("Prefix")
    first = [{"role": "system", "content": system}, {"role": "user", "content": "what is the answer?"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "please explain why."}]
    shared = common_prefix(prompt_tokens(llama_upstream, first), prompt_tokens(llama_upstream, second))
    assert shared >= 250

    a = chat(llama_upstream, first)["usage"]
    b = chat(llama_upstream, second)["usage"]
    # The first call shares at most a few template tokens (BOS, "<|im_start|>system") with other tests.
    assert a["prompt_tokens_details"]["cached_tokens"] < 10
    # One slot (-np 1) keeps the previous prompt's KV cache: the whole shared prefix is reused.
    cached = b["prompt_tokens_details"]["cached_tokens"]
    assert shared - 4 <= cached <= shared, (cached, shared)
    assert b["prompt_tokens"] > cached

    # The very same request again: everything but the last prompt token comes from the cache.
    c = chat(llama_upstream, second)["usage"]
    assert c["prompt_tokens_details"]["cached_tokens"] >= c["prompt_tokens"] - 1


def stream_chunks(base: str, messages: list[dict], **extra) -> list[dict]:
    payload = {"messages": messages, "max_tokens": 8, "stream": True, **extra}
    chunks, done = [], False
    with httpx.stream("POST", f"{base}/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line.removeprefix("data: ")))
    assert done
    return chunks


def test_streaming_usage_chunk(llama_upstream: str) -> None:
    messages = [{"role": "system", "content": long_system("Stream")}, {"role": "user", "content": "tell me a story"}]
    chat(llama_upstream, messages)  # warm the prompt cache with the same prompt
    chunks = stream_chunks(llama_upstream, messages, stream_options={"include_usage": True})

    *body, last = chunks
    # Usage comes once, in a final chunk with no choices, which also carries llama.cpp's timings.
    assert last["choices"] == []
    usage, timings = last["usage"], last["timings"]
    assert all("usage" not in c for c in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == 8 == timings["predicted_n"]
    assert usage["prompt_tokens"] == timings["cache_n"] + timings["prompt_n"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"] >= usage["prompt_tokens"] - 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in body)


def test_streaming_without_include_usage(llama_upstream: str) -> None:
    chunks = stream_chunks(llama_upstream, [{"role": "user", "content": "hello"}])
    assert all("usage" not in c for c in chunks)
    # llama.cpp still sends its timings (with cache_n), on the finish_reason chunk.
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] is not None
    assert {"cache_n", "prompt_n", "predicted_n"} <= last["timings"].keys()

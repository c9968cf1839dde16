"""What tollway publishes about its models, in OpenRouter's shapes: the models and their prices
(``GET /v1/models``), each model's upstreams with their live figures
(``GET /v1/models/{id}/endpoints``), and usage rankings (``GET /v1/rankings``). All of it is
aggregate: nothing here names a payer.
"""

from __future__ import annotations

import csv
import io
import time
from decimal import Decimal
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import BadRequest, NotFound
from .gateway import Gateway
from .pricing import per_million, plain

OPENROUTER_NAMES = {"cache_read": "input_cache_read", "cache_write": "input_cache_write"}
RANKING_WINDOWS = {"day": 86400, "week": 7 * 86400}
RANKINGS_CACHE_SECONDS = 60.0  # (a ranking reads a week of calls: once a minute per replica at most)


def usd_prices(gw: Gateway, model: str, own: dict[str, Decimal] | None = None) -> dict[str, Decimal]:
    """USD per token (``request``: per call), under OpenRouter's names for the cache prices: the
    model's (what its quotes cover), or an upstream's ``own`` for it."""
    per_token = gw.settings.models[model].per_token() if own is None else own
    return {OPENROUTER_NAMES.get(k, k): v for k, v in per_token.items()}


async def models(request: Request, gw: Gateway) -> Response:
    data = []
    for model_id, p in gw.prices.items():
        usd = usd_prices(gw, model_id)
        conf = gw.settings.models[model_id]
        data.append(
            {
                "id": model_id,
                "object": "model",
                "owned_by": "tollway",
                "name": conf.name or model_id,
                "context_length": conf.context_length,
                "supported_parameters": conf.supported_parameters,
                # OpenRouter's convention: USD per token, as decimal strings.
                "pricing": {k: plain(v) for k, v in usd.items()},
                "pricing_per_million": {k: plain(per_million(v)) for k, v in usd.items() if k != "request"},
                # The same in the payment asset's atomic units, per million tokens (rounded up).
                "pricing_atomic_per_million": {
                    OPENROUTER_NAMES.get(f, f): str(p.per_million(f))
                    for f in ("prompt", "completion", "cache_read", "cache_write")
                },
                "max_completion_tokens": conf.max_tokens,
                "free": conf.free,  # (served without payment up to the free tier's daily quotas)
                "payment": [
                    {"scheme": s.name, "network": s.network, "asset": gw.token} for s in gw.schemes if "x402" in s.rails
                ],
            }
        )
    return JSONResponse({"object": "list", "data": data})


async def endpoints(request: Request, gw: Gateway) -> Response:
    """One model's upstreams, each with its price, health and live figures (``stats.py``:
    uptime by window, seconds to first byte and output tokens/s by percentile over 30 minutes,
    prompt-cache hit rate and how much of the expected cache survived)."""
    model = request.path_params["model_id"]
    if model not in gw.prices:
        raise NotFound("no such model here; see GET /v1/models", code="model_not_found")
    health = {h["name"]: h for h in gw.router.health()}
    listed = []
    for u in gw.router.upstreams:
        if not u.serves(model):
            continue
        listed.append(
            {
                "name": f"{u.name}: {model}",
                "model_name": model,
                "provider_name": u.name,
                "tag": u.name,
                "pricing": {k: plain(v) for k, v in usd_prices(gw, model, u.prices.get(model)).items()},
                "max_completion_tokens": gw.settings.models[model].max_tokens,
                "status": "ok" if health[u.name]["healthy"] else "cooling_down",
                **gw.router.stats.figures(u.name, model).as_dict(),
            }
        )
    return JSONResponse({"data": {"id": model, "name": model, "endpoints": listed}})


def ranking_document(gw: Gateway) -> dict[str, Any]:
    """Usage share by model (calls and tokens) over the last day and week, from the ledger (read
    again at most once a minute: ``rankings``)."""
    now = time.time()
    return {"generated_at": int(now), "windows": _ranking_windows(gw, now)}


def _ranking_windows(gw: Gateway, now: float) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, seconds in RANKING_WINDOWS.items():
        rows = gw.store.usage_by_model(now - seconds)
        calls = sum(r["calls"] for r in rows)
        tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
        ranked = []
        for r in rows:
            t = r["prompt_tokens"] + r["completion_tokens"]
            ranked.append(
                {
                    "model": r["model"],
                    "calls": r["calls"],
                    "prompt_tokens": r["prompt_tokens"],
                    "completion_tokens": r["completion_tokens"],
                    "tokens": t,
                    "token_share": round(t / tokens, 4) if tokens else 0.0,
                    "call_share": round(r["calls"] / calls, 4) if calls else 0.0,
                }
            )
        out[name] = sorted(ranked, key=lambda r: (-r["tokens"], -r["calls"], r["model"]))
    return out


CSV_COLUMNS = ("window", "rank", "model", "calls", "prompt_tokens", "completion_tokens", "tokens", "token_share")


async def rankings(request: Request, gw: Gateway) -> Response:
    """``?format=json`` (default) or ``csv``."""
    doc = await gw.recent("rankings", RANKINGS_CACHE_SECONDS, partial(ranking_document, gw))
    fmt = request.query_params.get("format", "json")
    if fmt == "json":
        return JSONResponse(doc)
    if fmt != "csv":
        raise BadRequest("'format' is json or csv", code="invalid_format")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for window, rows in doc["windows"].items():
        for rank, r in enumerate(rows, 1):
            writer.writerow([window, rank, *(r[c] for c in CSV_COLUMNS[2:])])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")

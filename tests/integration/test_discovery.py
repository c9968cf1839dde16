"""Being found: every 402 declares x402's ``bazaar`` discovery extension, which the official SDK's
facilitator code validates and catalogues."""

from __future__ import annotations

import base64
import json

import httpx
from x402.extensions.bazaar.facilitator import extract_discovery_info, validate_discovery_extension

from support import CHAT, chat_body


def test_the_402_declares_a_bazaar_extension_the_official_facilitator_validates_and_catalogues(gateway):
    r = httpx.post(gateway.url + CHAT, json=chat_body("find me"), timeout=10)
    required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    declared = required["extensions"]["bazaar"]
    assert validate_discovery_extension(declared).valid
    accepted = next(o for o in required["accepts"] if o["scheme"] == "exact")
    # what a client sends back: the 402's resource and extensions, with its payment
    payment = {"x402Version": 2, "resource": required["resource"], "accepted": accepted, "payload": {}}
    found = extract_discovery_info({**payment, "extensions": required["extensions"]}, accepted)
    assert found is not None
    assert (found.method, found.resource_url) == ("POST", gateway.url + CHAT)
    assert found.discovery_info.input.body["model"] == "mock/echo"


def test_openapi_json_carries_mpp_discovery_annotations_and_llms_txt_explains_the_gateway(gateway, devnet):
    r = httpx.get(gateway.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.headers["cache-control"] == "max-age=300"
    doc = r.json()
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "tollway" and doc["info"]["version"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    (offer,) = chat["x-payment-info"]["offers"]
    assert offer == {**offer, "intent": "charge", "method": "evm", "amount": None, "currency": devnet.token}
    assert "402" in chat["responses"] and "200" in chat["responses"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]
    llms = doc["x-service-info"]["docs"]["llms"]
    assert llms == gateway.url + "/llms.txt"
    text = httpx.get(llms, timeout=10)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/markdown")
    assert text.text.startswith("# tollway\n") and "/v1/chat/completions" in text.text and devnet.token in text.text

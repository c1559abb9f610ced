"""Reranks through attncache-server with the official `cohere` SDK (v2 client, pinned by
scripts/setup-python); prints one JSON object.

Usage: python cohere_client.py BASE_URL API_KEY
"""
import json
import sys

import cohere
from cohere.core.api_error import ApiError

base, key = sys.argv[1], sys.argv[2]
co = cohere.ClientV2(api_key=key, base_url=base, timeout=120)
out = {}

docs = ["the room was dirty", "the food was great and cheap", "win cash"]
r = co.rerank(model="default", query="the food was great", documents=docs, top_n=2)
out["count"] = len(r.results)
out["indices"] = [x.index for x in r.results]
out["scores"] = [x.relevance_score for x in r.results]

# errors arrive as the SDK's typed exceptions carrying our OpenAI-style body
try:
    co.rerank(model="default", query="the food was great", documents=[])
    out["bad_request"] = "no error"
except ApiError as e:
    out["bad_request"] = e.status_code
    out["bad_request_param"] = (e.body or {}).get("error", {}).get("param")

wrong = cohere.ClientV2(api_key="wrong", base_url=base, timeout=120)
try:
    wrong.rerank(model="default", query="q", documents=["a"])
    out["wrong_key"] = "no error"
except ApiError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))

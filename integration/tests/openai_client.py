"""Talks to attncache-server with the official `openai` client; prints one JSON object.

Usage: python openai_client.py BASE_URL [API_KEY]
"""
import json
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
key = sys.argv[2] if len(sys.argv) > 2 else "unused"
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
out = {}

# the client's default asks for base64 and decodes it
r = client.embeddings.create(model="default", input=["the food was great", "hello"])
out["default_lengths"] = [len(d.embedding) for d in r.data]
out["default_indices"] = [d.index for d in r.data]
out["usage"] = r.usage.prompt_tokens

f = client.embeddings.create(model="default", input="the food was great", encoding_format="float")
out["float"] = f.data[0].embedding
out["base64_first"] = r.data[0].embedding

# per-request cache flag through extra_body; the extra response field is kept by the client
first = client.embeddings.create(
    model="default", input="the staff were lovely", encoding_format="float",
    extra_body={"attn_cache": True},
)
again = client.embeddings.create(
    model="default", input="the staff were lovely", encoding_format="float",
    extra_body={"attn_cache": True},
)
out["first_outcome"] = first.model_extra["attn_cache"]["inputs"][0]["outcome"]
out["again_outcome"] = again.model_extra["attn_cache"]["inputs"][0]["outcome"]
out["again_same"] = first.data[0].embedding == again.data[0].embedding

# errors arrive as the client's typed exceptions
try:
    client.embeddings.create(model="no-such-model", input="x")
    out["not_found"] = "no error"
except openai.NotFoundError as e:
    out["not_found"] = e.body.get("code") if isinstance(e.body, dict) else str(e.body)
try:
    client.embeddings.create(model="default", input=[])
    out["empty"] = "no error"
except openai.BadRequestError as e:
    out["empty"] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

# flag by default (server default off) and explicitly off
d = client.embeddings.create(model="default", input="the room was clean", encoding_format="float")
out["default_outcome"] = d.model_extra["attn_cache"]["inputs"][0]["outcome"]
o = client.embeddings.create(
    model="default", input="the staff were lovely", encoding_format="float",
    extra_body={"attn_cache": False},
)
out["off_outcome"] = o.model_extra["attn_cache"]["inputs"][0]["outcome"]

# dimensions: the full size works; a size the model was not trained for is a 400
full = len(f.data[0].embedding)
out["dims_full"] = len(client.embeddings.create(
    model="default", input="x y", dimensions=full, encoding_format="float").data[0].embedding)
try:
    client.embeddings.create(model="default", input="x y", dimensions=full // 2)
    out["dims_bad"] = "no error"
except openai.BadRequestError as e:
    out["dims_bad"] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

# classification through the client's generic POST
c = client.post(
    "/classify", cast_to=object,
    body={"model": "default", "input": ["the room was great", "the room was rude"],
          "attn_cache": True},
)
out["classify_labels"] = len(c["data"])
out["classify_num_classes"] = c["data"][0]["num_classes"]
out["classify_outcome"] = c["attn_cache"]["inputs"][0]["outcome"]

# a wrong API key is the client's AuthenticationError (401)
try:
    OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0).embeddings.create(
        model="default", input="x")
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.body.get("code") if isinstance(e.body, dict) else str(e.body)

print(json.dumps(out))

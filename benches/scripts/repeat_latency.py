"""Latency of one repeated request, flag off vs on, against a running attncache-server.

Usage: python repeat_latency.py BASE_URL [ROUNDS]
Sends the same ~140-token text ROUNDS times with the flag off, then ROUNDS+1 times with the
flag on (the first is a miss that records; the rest are answered from the cache), through
the official `openai` client, and prints medians, outcomes and the cosine of on vs off.
"""
import statistics
import sys
import time

from openai import OpenAI

base = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
text = "title: none | text: " + " ".join(
    ["The hotel was close to the station, the staff were friendly and the breakfast was good,"
     " but the room was small and the walls were thin, so we heard every door all night."] * 4)


def embed(flag):
    t = time.perf_counter()
    r = client.embeddings.create(model="default", input=text, encoding_format="float",
                                 extra_body={"attn_cache": flag})
    ms = (time.perf_counter() - t) * 1e3
    return ms, r.data[0].embedding, r.model_extra["attn_cache"]["inputs"][0], r.usage.prompt_tokens


embed(False)  # warm-up
off = [embed(False) for _ in range(rounds)]
on = [embed(True) for _ in range(rounds + 1)]
dot = sum(a * b for a, b in zip(off[0][1], on[-1][1]))
norm = (sum(a * a for a in off[0][1]) * sum(b * b for b in on[-1][1])) ** 0.5
print(f"tokens {off[0][3]}, rounds {rounds}")
print(f"flag off: median {statistics.median(m for m, *_ in off):.1f} ms")
print(f"flag on, first: {on[0][0]:.1f} ms ({on[0][2]['outcome']})")
rest = on[1:]
print(f"flag on, repeats: median {statistics.median(m for m, *_ in rest):.1f} ms "
      f"(outcomes: {sorted(set(o['outcome'] for *_, o, _ in rest))})")
print(f"hit rate of the repeats: {sum(o['outcome'] != 'miss' for *_, o, _ in rest) / len(rest):.2f}")
print(f"cosine(flag on repeat, flag off) = {dot / norm:.7f}")

#!/usr/bin/env python3
"""Blend reuse on short near duplicates: yelp reviews of 12-40 words (npm `sentiment`
fixtures, `make fetch-data`) with one word swapped for an intensifier, served by
attncache-server --reuse blend under each given configuration, in turn.

Per pair: A is stored (flag on), B is asked with the flag off, then on. Prints, per
configuration: near hits and misses, the fidelity (cosine of B's flag-on embedding to its
flag-off one) of the hits, and served speed-up (sum of flag-off times over sum of flag-on
times). Pass a configuration more than once to interleave repeated runs.

Usage:
  benches/scripts/short_pairs.py --server target/release/attncache-server \\
      --config "--blend-min-gain 0" --config "" --config "--blend-min-gain 0" --config ""
"""

import argparse
import json
import math
import os
import random
import subprocess
import time
import urllib.request

SWAPS = ["really", "very", "truly", "quite", "so", "rather"]


def pairs(data_dir, n, seed):
    rows = json.load(open(os.path.join(data_dir, "yelp.json")))
    texts = [r["text"] if isinstance(r, dict) else r[0] for r in rows]
    texts = [t for t in texts if isinstance(t, str) and 12 <= len(t.split()) <= 40]
    rng = random.Random(seed)
    rng.shuffle(texts)
    out = []
    for t in texts[:n]:
        words = t.split()
        edited = list(words)
        at = rng.randrange(len(words))
        edited[at] = rng.choice(SWAPS)
        out.append((t, " ".join(edited)))
    return out


def post(port, text, flag):
    body = json.dumps({"input": [text], "attn_cache": flag}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings", body, {"content-type": "application/json"}
    )
    start = time.perf_counter()
    r = json.load(urllib.request.urlopen(req))
    ms = (time.perf_counter() - start) * 1e3
    return r["data"][0]["embedding"], r["attn_cache"]["inputs"][0], r["usage"]["prompt_tokens"], ms


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="the attncache-server binary")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/attncache/models/embeddinggemma-300m"))
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/attncache/data/sentiment"))
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--config", action="append", default=[], help="extra server flags (repeatable)")
    args = ap.parse_args()
    work = pairs(args.data, args.pairs, args.seed)
    for i, cfg in enumerate(args.config or [""]):
        port = 18200 + i
        cmd = [args.server, "--model", args.model, "--port", str(port), "--reuse", "blend",
               "--repeat-mib", "0"] + cfg.split()
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            while "listening" not in server.stdout.readline():
                if server.poll() is not None:
                    raise SystemExit(f"short-pairs: the server exited ({cfg!r})")
            hits, fidelity, tokens, off_ms, on_ms = 0, [], [], 0.0, 0.0
            for a, b in work:
                post(port, a, True)
                exact, _, n, ms_off = post(port, b, False)
                served, report, _, ms_on = post(port, b, True)
                tokens.append(n)
                off_ms += ms_off
                on_ms += ms_on
                if report["outcome"] == "near_hit":
                    hits += 1
                    fidelity.append(cosine(served, exact))
        finally:
            server.terminate()
            server.wait()
        fid = (f"fidelity mean {sum(fidelity) / len(fidelity):.5f} min {min(fidelity):.5f}"
               if fidelity else "no hits")
        print(f"[{cfg}] pairs {len(work)}, tokens {min(tokens)}-{max(tokens)}: near hits {hits}, "
              f"misses {len(work) - hits}; {fid}; served off/on {off_ms / on_ms:.3f}x "
              f"(sum off {off_ms:.0f} ms, on {on_ms:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()

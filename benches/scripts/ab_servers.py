#!/usr/bin/env python3
"""Interleaved A/B of attncache-server binaries on one machine.

Starts one server per binary (ports 18100, 18101, ...), sends the same token-id input of
N tokens to each in turn (the order alternates every round), and prints each binary's
median wall time, its ratio to the first binary and the cosine of its embedding to the
first one's. For a change to the exact path: build, copy the binary aside, build the other
variant, then

    python3 benches/scripts/ab_servers.py --model DIR --tokens 512 --rounds 8 old-bin new-bin

Only the standard library; flag off (`attn_cache: false`), so every call is a forward.
"""
import argparse
import json
import random
import statistics
import subprocess
import time
import urllib.request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory given to every server")
    ap.add_argument("--tokens", type=int, default=512, help="token ids per input (default 512)")
    ap.add_argument("--rounds", type=int, default=8, help="calls per server (default 8)")
    ap.add_argument("--first-port", type=int, default=18100, help="port of the first server")
    ap.add_argument("binaries", nargs="+", help="attncache-server binaries; the first is the baseline")
    args = ap.parse_args()

    ports = [args.first_port + i for i in range(len(args.binaries))]
    procs = [
        subprocess.Popen([b, "--model", args.model, "--port", str(p)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for b, p in zip(args.binaries, ports)
    ]
    try:
        for p in ports:
            wait_ready(p)
        model_id = get_json(f"http://127.0.0.1:{ports[0]}/v1/models")["data"][0]["id"]
        rng = random.Random(0)
        ids = [rng.randrange(1000, 200000) for _ in range(args.tokens)]
        for p in ports:  # warm-up
            call(p, model_id, ids)
        times = {p: [] for p in ports}
        last = {}
        for r in range(args.rounds):
            for p in (ports if r % 2 == 0 else ports[::-1]):
                ms, emb = call(p, model_id, ids)
                times[p].append(ms)
                last[p] = emb
        base = statistics.median(times[ports[0]])
        for b, p in zip(args.binaries, ports):
            m = statistics.median(times[p])
            print(f"{args.tokens} tokens {b}: median {m:.1f} ms, first/this {base / m:.3f}, "
                  f"cos to first {cosine(last[ports[0]], last[p]):.8f}", flush=True)
    finally:
        for pr in procs:
            pr.terminate()


def get_json(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def wait_ready(port: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except Exception:
            time.sleep(1)
    raise SystemExit(f"server on port {port} did not come up in {timeout_s} s")


def call(port: int, model_id: str, ids):
    body = json.dumps({"model": model_id, "input": [ids], "attn_cache": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", body,
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    out = json.loads(urllib.request.urlopen(req, timeout=600).read())
    return (time.perf_counter() - t) * 1000, out["data"][0]["embedding"]


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Latency and throughput of attncache-server under concurrent clients (issue 21's load).

Starts the server binary on a free port (once per configuration, one after the other,
never two at once), lets --clients threads send /v1/embeddings requests for --duration-s
seconds each: 1-4 inputs per request, each a window of 8-120 words of the SpamAssassin
corpus, the cache flag on for half the requests (a fixed seed, so every configuration gets
the same sequence of requests). Prints one progress line per 10 s and a summary per
configuration: requests/s, input tokens/s (from `usage`, over the time from the first
request to the last answer), p50/p90/p99/max latency, errors.
Writes the summary as JSON (--out).

    python3 benches/scripts/serve_load.py --server target/release/attncache-server \
        --model ~/.cache/attncache/models/embeddinggemma-300m \
        --spam ~/.cache/attncache/data/spam-assassin \
        --config queue= --config "no-queue=--engine-requests 0" --out benches/results/serve-load.json

Standard library only.
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def words_of(spam_dir, limit=400):
    words = []
    for root, _, files in os.walk(spam_dir):
        for name in sorted(files)[:limit]:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    text = f.read().decode("latin-1")
            except OSError:
                continue
            body = text.split("\n\n", 1)[-1]
            words.extend(w for w in re.findall(r"[A-Za-z][A-Za-z'-]{1,14}", body))
    if len(words) < 1000:
        sys.exit(f"serve_load: too few words under {spam_dir}")
    return words


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server, model, extra):
    port = free_port()
    cmd = [server, "--model", model, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/info", timeout=1).read()
            return proc, base
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                sys.exit(f"serve_load: {' '.join(cmd)} exited with {proc.returncode}")
            time.sleep(0.5)
    proc.kill()
    sys.exit("serve_load: the server did not start")


def requests_for(seed, words, n):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        inputs = []
        for _ in range(rng.randint(1, 4)):
            k = rng.randint(8, 120)
            at = rng.randrange(0, len(words) - k)
            inputs.append(" ".join(words[at:at + k]))
        out.append({"model": "default", "input": inputs, "attn_cache": rng.random() < 0.5})
    return out


def batches_of(base):
    """How many inputs the queue let into the engine per batch (its /metrics histogram)."""
    try:
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("attncache_engine_batch_size_sum", "attncache_engine_batch_size_count"):
            values[name] = float(value)
    n = values.get("attncache_engine_batch_size_count", 0)
    if not n:
        return {}
    return {"batches": int(n), "inputs_per_batch": values["attncache_engine_batch_size_sum"] / n}


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def run(base, bodies, clients, duration):
    lock = threading.Lock()
    latencies, tokens, errors, statuses = [], [0], [0], {}
    # when the last answer arrived: the wall time ends there, not at the next progress tick
    last_done = [time.monotonic()]
    next_body = [0]
    stop_at = time.monotonic() + duration

    def client():
        while time.monotonic() < stop_at:
            with lock:
                body = bodies[next_body[0] % len(bodies)]
                next_body[0] += 1
            data = json.dumps(body).encode()
            req = urllib.request.Request(base + "/v1/embeddings", data=data,
                                         headers={"content-type": "application/json"})
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = json.loads(r.read())
                took = time.monotonic() - t0
                with lock:
                    latencies.append(took)
                    tokens[0] += answer["usage"]["prompt_tokens"]
                    last_done[0] = max(last_done[0], time.monotonic())
            except urllib.error.HTTPError as e:
                with lock:
                    errors[0] += 1
                    statuses[e.code] = statuses.get(e.code, 0) + 1
            except (urllib.error.URLError, OSError):
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    next_line = started + 10
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        if time.monotonic() >= next_line:
            next_line += 10
            with lock:
                done = len(latencies)
            print(f"  {time.monotonic() - started:5.0f} s: {done} requests", flush=True)
    wall = max(last_done[0], started + 1e-9) - started
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "error_statuses": statuses,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": percentile(latencies, 0.50),
        "p90_s": percentile(latencies, 0.90),
        "p99_s": percentile(latencies, 0.99),
        "max_s": max(latencies) if latencies else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="attncache-server binary")
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--spam", required=True, help="SpamAssassin corpus (scripts/fetch-spam)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--duration-s", type=float, default=60, help="seconds per configuration")
    ap.add_argument("--seed", type=int, default=21, help="seed of the request sequence")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=EXTRA SERVER ARGS, run in the order given (default: one, no extra)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the configurations this many times, alternating")
    ap.add_argument("--out", help="JSON file for the summaries")
    args = ap.parse_args()
    configs = [c.split("=", 1) for c in args.config] or [["default", ""]]
    words = words_of(args.spam)
    bodies = requests_for(args.seed, words, 20000)
    results = []
    for rnd in range(args.rounds):
        for name, extra in configs:
            proc, base = start(args.server, args.model, extra.split())
            try:
                print(f"{name} (round {rnd + 1}): {args.clients} clients, {args.duration_s:.0f} s",
                      flush=True)
                r = run(base, bodies, args.clients, args.duration_s)
                r.update(batches_of(base))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r.update(config=name, server_args=extra, round=rnd + 1, clients=args.clients)
            print(f"{name}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"p50 {r['p50_s']:.3f} s, p90 {r['p90_s']:.3f} s, p99 {r['p99_s']:.3f} s "
                  f"(p99/p50 {r['p99_s'] / r['p50_s']:.2f}), max {r['max_s']:.3f} s, "
                  f"errors {r['errors']}"
                  + (f", {r['inputs_per_batch']:.3f} inputs per batch" if "batches" in r else ""),
                  flush=True)
            results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"clients": args.clients, "duration_s": args.duration_s,
                       "seed": args.seed, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()

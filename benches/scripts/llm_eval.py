"""`make llm-eval`: the cache's approximate reuse on a decoder, against its exact paths.

Stage ``spam`` (decoder blend): near-duplicate SpamAssassin emails classified by prompt
("Is this email spam? Answer yes or no.") on SmolLM2-135M. Pairs are mined from the corpus
(the first ``--chars`` characters of each message body; two bodies pair when the Jaccard
similarity of their word 4-shingle sets is at least 0.5 and they are not identical), each message in one pair
at most. For each pair the first email is stored (cache flag on) in two servers, then the
second is asked:

- ``exact``: flag off (the reference);
- ``prefix``: the default server, flag on: exact prefix reuse (the positions before the
  first differing token come from the store, the rest is computed);
- ``blend``: a server with ``--reuse blend``, flag on: past the exact prefix, the stored
  email's K/V where its tokens sit at the same positions, only the positions that differ or
  deviate most recomputed after the check layer (docs/decoders.md).

The three asks rotate their order pair by pair, one at a time. Reported: the blend server's
outcomes (blend hits, plain prefix hits), the time sums and their ratios (``blend`` against
``prefix`` is the floor's comparison), label agreement with exact (p(yes) > 0.5) and the
share of inputs whose p(yes) is within 0.02 of exact, with the worst difference. Every
timing is the client's wall time of one ``POST /v1/classify`` (lookup, loading and the
forward included).

Writes ``OUT.json`` and ``OUT.md``; progress on stderr, a line per 10 pairs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_bench  # noqa: E402  (Server, machine facts)

LABELS = [" yes", " no"]
PROMPT = "Here is an email.\n\n{email}\n\nIs this email spam? Answer yes or no. Answer:"


def log(msg: str) -> None:
    print(f"llm-eval: {msg}", file=sys.stderr, flush=True)


def body(text: str) -> str:
    """A message's body: what follows its headers' first blank line."""
    parts = text.replace("\r\n", "\n").split("\n\n", 1)
    return parts[1] if len(parts) == 2 else parts[0]


def mine_pairs(corpus: Path, chars: int, limit: int) -> list[tuple[str, str, str]]:
    """Near-duplicate bodies (cut to `chars`): (group, stored, asked), greedy by overlap."""
    docs = []
    for group in sorted(p for p in corpus.iterdir() if p.is_dir()):
        for f in sorted(group.glob("*.json")):
            text = body(json.loads(f.read_text(errors="replace"))["text"])[:chars]
            if len(text) >= chars // 2:
                docs.append((group.name, text))
    shingles = []
    postings: dict[int, list[int]] = {}
    for i, (_, text) in enumerate(docs):
        words = text.split()
        s = {hash(tuple(words[k:k + 4])) for k in range(max(0, len(words) - 3))}
        shingles.append(s)
        for h in s:
            postings.setdefault(h, []).append(i)
    shared: dict[tuple[int, int], int] = {}
    for ids in postings.values():
        if 1 < len(ids) <= 40:
            for a in range(len(ids)):
                for b in range(a + 1, len(ids)):
                    shared[(ids[a], ids[b])] = shared.get((ids[a], ids[b]), 0) + 1
    scored = []
    for (i, j), n in shared.items():
        jaccard = n / max(1, len(shingles[i]) + len(shingles[j]) - n)
        if jaccard >= 0.5 and docs[i][1] != docs[j][1]:
            scored.append((-jaccard, i, j))
    scored.sort()
    used: set[int] = set()
    pairs = []
    for _, i, j in scored:
        if i in used or j in used:
            continue
        used.update((i, j))
        pairs.append((docs[i][0], docs[i][1], docs[j][1]))
        if len(pairs) == limit:
            break
    return pairs


class Classifier(peer_bench.Server):
    """`POST /v1/classify` of one prompt over " yes" / " no", the cache flag as asked."""

    def ask(self, text: str, cache: bool) -> tuple[float, dict, float]:
        body = json.dumps({"input": text, "labels": LABELS, "attn_cache": cache}).encode()
        conn = self._conn()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/classify", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        secs = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:500]!r}")
        out = json.loads(data)
        return out["data"][0]["probs"][0], out["attn_cache"]["inputs"][0], secs


def spam_stage(prefix: Classifier, blend: Classifier, pairs: list) -> dict:
    systems = {"exact": (prefix, False), "prefix": (prefix, True), "blend": (blend, True)}
    names = list(systems)
    rows = []
    t_stage = time.perf_counter()
    for n, (group, stored, asked) in enumerate(pairs):
        for server in (prefix, blend):
            server.ask(PROMPT.format(email=stored), True)
        row = {"group": group}
        order = names[n % 3:] + names[: n % 3]
        for name in order:
            server, flag = systems[name]
            p, report, secs = server.ask(PROMPT.format(email=asked), flag)
            row[name] = {"p_yes": p, "seconds": secs, "outcome": report["outcome"],
                         "prefix_tokens": report.get("prefix_tokens", 0),
                         "recomputed": report.get("recomputed"), "blended": report.get("blended")}
        rows.append(row)
        if (n + 1) % 10 == 0 or n + 1 == len(pairs):
            log(f"spam {n + 1}/{len(pairs)}: " + ", ".join(
                f"{k} {sum(r[k]['seconds'] for r in rows):.1f} s" for k in names)
                + f" [{time.perf_counter() - t_stage:.0f} s]")
    t = {k: sum(r[k]["seconds"] for r in rows) for k in names}
    diffs = [abs(r["blend"]["p_yes"] - r["exact"]["p_yes"]) for r in rows]
    agree = sum((r["blend"]["p_yes"] > 0.5) == (r["exact"]["p_yes"] > 0.5) for r in rows)
    hits = [r for r in rows if r["blend"]["outcome"] == "blend_hit"]
    hit_diffs = [abs(r["blend"]["p_yes"] - r["exact"]["p_yes"]) for r in hits]
    share = [r["blend"]["recomputed"] / (r["blend"]["recomputed"] + r["blend"]["blended"])
             for r in hits if (r["blend"]["recomputed"] or 0) + (r["blend"]["blended"] or 0)]
    return {
        "pairs": len(rows),
        "outcomes": {o: sum(r["blend"]["outcome"] == o for r in rows)
                     for o in sorted({r["blend"]["outcome"] for r in rows})},
        "seconds": t,
        "blend_vs_prefix": t["prefix"] / t["blend"],
        "blend_vs_exact": t["exact"] / t["blend"],
        "prefix_vs_exact": t["exact"] / t["prefix"],
        "hit_blend_vs_prefix": (sum(r["prefix"]["seconds"] for r in hits)
                                / sum(r["blend"]["seconds"] for r in hits)) if hits else None,
        "label_agreement": agree / len(rows),
        "within_0.02": sum(d <= 0.02 for d in diffs) / len(rows),
        "max_abs_diff": max(diffs),
        "hit_max_abs_diff": max(hit_diffs) if hit_diffs else None,
        "hit_median_recomputed_share": statistics.median(share) if share else None,
        "prefix_mean_tokens": statistics.mean(r["prefix"]["prefix_tokens"] for r in rows),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    s = result["stages"]["spam"]
    m = result["machine"]
    lines = [
        "# Decoder blend: near-duplicate spam classified by prompt",
        "",
        f"Commit `{result['commit']}`, {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB), "
        f"{result['date']}; model "
        f"`{result['model']}`; {s['pairs']} mined pairs; wall {result['wall_s']:.0f} s.",
        "",
        f"Blend server outcomes: {s['outcomes']}.",
        "",
        "| system | seconds (sum) | vs exact |",
        "|---|---|---|",
    ]
    for k in ("exact", "prefix", "blend"):
        lines.append(f"| {k} | {s['seconds'][k]:.2f} | {s['seconds']['exact'] / s['seconds'][k]:.2f}x |")
    hit = s["hit_blend_vs_prefix"]
    lines += [
        "",
        f"- blend vs exact with prefix reuse: **{s['blend_vs_prefix']:.2f}x** over all pairs"
        + (f", {hit:.2f}x on the blend hits" if hit else ""),
        f"- label agreement with exact: {s['label_agreement']:.4f}; p(yes) within 0.02 of "
        f"exact: {s['within_0.02']:.4f}; largest difference {s['max_abs_diff']:.4f}",
    ]
    if s["hit_median_recomputed_share"] is not None:
        lines.append(f"- blend hits recomputed a median {s['hit_median_recomputed_share']:.2f} "
                     "of the positions after the exact prefix")
    return "\n".join(lines) + "\n"


SPAM_KEYS = ("llm_spam_blend_speedup", "llm_spam_agreement", "llm_spam_within_002")


def merge_into(llm_json: Path, result: dict, source: str) -> None:
    """Copies the spam stage's headline keys into `llm_json` (where the floors are read),
    naming the file and commit they come from."""
    data = json.loads(llm_json.read_text()) if llm_json.exists() else {}
    for k in SPAM_KEYS:
        data[k] = result[k]
    data["llm_spam_source"] = {"file": source, "commit": result["commit"], "date": result["date"]}
    llm_json.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the GGUF file (llama)")
    p.add_argument("--server", required=True, help="the attncache-server binary")
    p.add_argument("--spam", required=True, type=Path, help="SpamAssassin (make fetch-spam)")
    p.add_argument("--pairs", type=int, default=100, help="mined pairs to serve (at most)")
    p.add_argument("--chars", type=int, default=1200, help="characters of each body kept")
    p.add_argument("--blend-flags", default="",
                   help="more flags for the blend server, e.g. '--decoder-blend-share 0.3'")
    p.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS of the servers")
    p.add_argument("--out", default="benches/results/llm-eval", help="writes OUT.json and OUT.md")
    p.add_argument("--llm-json", type=Path, default=Path("benches/results/llm.json"),
                   help="also copies the headline keys (llm_spam_*) into this file ('' for none)")
    args = p.parse_args()
    t0 = time.perf_counter()
    pairs = mine_pairs(args.spam, args.chars, args.pairs)
    log(f"{len(pairs)} mined near-duplicate pairs")
    logdir = Path("target/llm-eval")
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        prefix = Classifier("prefix", args.server, str(args.model), [], args.threads, logdir, 300)
        peer_bench._SERVERS.append(prefix)
        blend = Classifier("blend", args.server, str(args.model),
                           ["--reuse", "blend", *args.blend_flags.split()], args.threads,
                           logdir, 300)
        peer_bench._SERVERS.append(blend)
        stage = spam_stage(prefix, blend, pairs)
    finally:
        peer_bench.stop_servers()
    result = {
        "commit": peer_bench.git_commit(),
        "machine": peer_bench.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model.name,
        "blend_flags": args.blend_flags,
        "wall_s": time.perf_counter() - t0,
        "llm_spam_blend_speedup": stage["blend_vs_prefix"],
        "llm_spam_agreement": stage["label_agreement"],
        "llm_spam_within_002": stage["within_0.02"],
        "stages": {"spam": stage},
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out}.json and {out}.md")
    if str(args.llm_json):
        merge_into(args.llm_json, result, f"{out}.json")
        log(f"copied {', '.join(SPAM_KEYS)} into {args.llm_json}")
    print(markdown(result))


if __name__ == "__main__":
    main()

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
- ``blend``: a server with ``--reuse blend`` and ``--blend-flags`` (``make llm-eval`` passes
  ``--blend-gate config/decoder-blend-gate-smollm2.json``), flag on: past the exact prefix,
  the stored email's K/V where its tokens sit at the same positions, only the positions
  that differ or deviate most recomputed after the check layer; under a gate, a blend whose
  stale deviation is over the bound is computed exactly (``blend_refused``;
  docs/decoders.md).

``--pair-offset`` and ``--rerank-offset`` skip the pairs and questions a gate was fitted on
(``make llm-gate`` fits on the first 150 pairs and the first 16 questions; ``make llm-eval``
serves from pair 150 and question 100).

The three asks rotate their order pair by pair, one at a time. Reported: the blend server's
outcomes (blend hits, plain prefix hits), the time sums and their ratios (``blend`` against
``prefix`` is the floor's comparison), label agreement with exact (p(yes) > 0.5) and the
share of inputs whose p(yes) is within 0.02 of exact, with the worst difference. Every
timing is the client's wall time of one ``POST /v1/classify`` (lookup, loading and the
forward included).

Stage ``rerank`` (decoder blend of documents that recur across queries): BoolQ's
validation questions and Wikipedia passages (``scripts/fetch-boolq``) reranked by
``POST /v1/rerank`` (p(yes) under the server's default template, query before document).
A pool of ``--rerank-pool`` passages (the first of the split between 400 and 1000
characters, distinct); each measured query (the question of one pool passage) reranks its
own passage and ``--rerank-docs`` − 1 others drawn from the pool (seeded), so passages recur
across queries. Before the measured queries, warm-up queries (not measured) rerank the pool
in slices on both servers, as a deployment that has reranked its corpus before. Each
measured query is asked once per system (``exact``, ``prefix``, ``blend`` as above; order
rotating query by query); the time is the client's wall time of the whole request (its
20 prompts, lookup and loading included). Reported: time sums and ratios, per-query
Spearman correlation of the blend scores with exact (and of prefix reuse's, which should be
1), top-1 agreement, the largest score difference, and the blend server's outcomes.

Stage ``mmlu`` (the paper's map reuse, ``--decoder-maps``): MMLU 5-shot by the paper's
protocol against exact prefill and exact prefix reuse; ``llm_maps.py`` says how.

Writes ``OUT.json`` and ``OUT.md``; progress on stderr, a line per 10 pairs, 4 queries or
10 questions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_bench  # noqa: E402  (MMLU's server client)
import llm_maps  # noqa: E402  (the mmlu stage)
import peer_bench  # noqa: E402  (Server, machine facts)

LABELS = [" yes", " no"]
# the server's default --score-template with the document first
DOC_FIRST = ("Document: {document}\nQuery: {query}\nDoes the document answer the query? "
             "Answer yes or no.\nAnswer:")
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

    def post(self, path: str, payload: dict) -> tuple[dict, float]:
        """The JSON answer of one POST and its wall time; an error status raises."""
        conn = self._conn()
        t0 = time.perf_counter()
        conn.request("POST", path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        secs = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:500]!r}")
        return json.loads(data), secs

    def blend_setting(self) -> dict | None:
        """The decoder blend policy this server runs (`/info`), its gate file included,
        without the counters."""
        conn = self._conn()
        conn.request("GET", "/info")
        blend = json.loads(conn.getresponse().read())["attn_cache"].get("decoder_blend")
        if blend:
            blend.pop("counts", None)
        return blend

    def ask(self, text: str, cache: bool) -> tuple[float, dict, float]:
        out, secs = self.post("/v1/classify", {"input": text, "labels": LABELS, "attn_cache": cache})
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
                         "recomputed": report.get("recomputed"), "blended": report.get("blended"),
                         "stale": report.get("stale_deviation"),
                         "stale_mean": report.get("stale_mean")}
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
        "stale_vs_error": stale_vs_error(
            [(r["blend"].get("stale"), abs(r["blend"]["p_yes"] - r["exact"]["p_yes"])) for r in hits]),
        "gate_holdout": gate_holdout(rows),
        "rows": rows,
    }


class Reranker(Classifier):
    """`POST /v1/rerank` of one query over documents, the cache flag as asked."""

    def rerank(self, query: str, docs: list[str], cache: bool) -> dict:
        """Each document's score, cache outcome and stale deviation (by index), and the time."""
        out, secs = self.post("/v1/rerank", {"query": query, "documents": docs,
                                             "attn_cache": cache, "return_documents": False})
        got = {"scores": [0.0] * len(docs), "outcomes": ["off"] * len(docs),
               "stale": [None] * len(docs), "seconds": secs}
        for r in out["results"]:
            got["scores"][r["index"]] = r["relevance_score"]
        for r in (out.get("attn_cache") or {}).get("inputs", []):
            got["outcomes"][r["index"]] = r["outcome"]
            got["stale"][r["index"]] = r.get("stale_deviation")
        return got


def stale_vs_error(points: list) -> dict | None:
    """How the blend hits' stale deviation (reported per input) predicts their error: the
    Spearman correlation, and the largest error of the hits under each quartile of it."""
    pts = sorted((s, e) for s, e in points if s is not None)
    if len(pts) < 8:
        return None
    qs = [pts[min(len(pts) - 1, int(len(pts) * f))][0] for f in (0.25, 0.5, 0.75, 1.0)]
    return {
        "hits": len(pts),
        "spearman": spearman([s for s, _ in pts], [e for _, e in pts]),
        "max_error_under": [{"stale_at_most": q, "hits": sum(s <= q for s, _ in pts),
                             "max_error": max(e for s, e in pts if s <= q)} for q in qs],
    }


def gate_holdout(rows: list, tolerance: float = 0.02, min_group: int = 10) -> list[dict]:
    """A stale-deviation bound fitted on some mined groups and judged on another, from the
    recorded rows (no rerun): for each group with at least `min_group` pairs held out, the
    bound is the largest stale deviation up to which every blend hit of the other groups is
    within half the tolerance; the held-out group's hits under it are taken, the others
    answered exactly. Its time is an estimate: a refused hit is charged the plain prefix
    hit's time (its own cost up to the check layer is left out, so the estimate flatters)."""
    err = lambda r: abs(r["blend"]["p_yes"] - r["exact"]["p_yes"])  # noqa: E731
    hit = lambda r: r["blend"]["outcome"] == "blend_hit" and r["blend"].get("stale") is not None  # noqa: E731
    out = []
    for group in sorted({r["group"] for r in rows}):
        test = [r for r in rows if r["group"] == group]
        if len(test) < min_group:
            continue
        bound = 0.0
        for r in sorted((r for r in rows if r["group"] != group and hit(r)),
                        key=lambda r: r["blend"]["stale"]):
            if err(r) > tolerance / 2:
                break
            bound = r["blend"]["stale"]
        taken = [hit(r) and r["blend"]["stale"] <= bound for r in test]
        errors = [err(r) if t else 0.0 for r, t in zip(test, taken)]
        agree = sum((r["blend"]["p_yes"] > 0.5 if t else r["exact"]["p_yes"] > 0.5)
                    == (r["exact"]["p_yes"] > 0.5) for r, t in zip(test, taken))
        t_gate = sum(r["blend"]["seconds"] if t else r["prefix"]["seconds"] for r, t in zip(test, taken))
        out.append({"held_out": group, "pairs": len(test), "bound": bound,
                    "calibration_hits": sum(hit(r) for r in rows if r["group"] != group),
                    "hits_ungated": sum(hit(r) for r in test), "taken": sum(taken),
                    "within_tolerance": sum(e <= tolerance for e in errors) / len(test),
                    "max_error": max(errors), "label_agreement": agree / len(test),
                    "est_vs_prefix": sum(r["prefix"]["seconds"] for r in test) / t_gate})
    return out


def rerank_set(boolq: Path, queries: int, pool: int, per_query: int, seed: int,
               offset: int = 0) -> dict:
    """The pool of passages, the warm-up slices and the measured queries (see the module doc);
    `offset`: skip the split's first usable questions and passages (another run's)."""
    rows = [json.loads(line) for line in (boolq / "validation.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    keep = []
    for r in rows:
        if 400 <= len(r["passage"]) <= 1000 and r["passage"] not in seen:
            seen.add(r["passage"])
            keep.append(r)
    keep = keep[offset:]
    passages = [r["passage"] for r in keep[:pool]]
    rng = random.Random(seed)
    measured = []
    for q in range(min(queries, len(passages))):
        others = [p for i, p in enumerate(passages) if i != q]
        docs = [passages[q]] + rng.sample(others, per_query - 1)
        rng.shuffle(docs)
        measured.append({"query": keep[q]["question"], "docs": docs,
                         "own": docs.index(passages[q])})
    # warm-up: other questions of the split, each over one slice of the pool
    warm_questions = [r["question"] for r in keep[pool:]]
    warm = [{"query": warm_questions[i], "docs": passages[s:s + per_query]}
            for i, s in enumerate(range(0, len(passages), per_query))]
    return {"passages": passages, "warm": warm, "measured": measured}


def ranks(xs: list[float]) -> list[float]:
    """Ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks; 1.0 when both are constant and equal)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return 1.0 if ra == rb else 0.0
    return cov / (va * vb) ** 0.5


def rerank_stage(prefix: Reranker, blend: Reranker, docfirst: Reranker, data: dict) -> dict:
    for w in data["warm"]:
        for server in (prefix, blend, docfirst):
            server.rerank(w["query"], w["docs"], True)
    log(f"rerank: warm-up done ({len(data['warm'])} queries over {len(data['passages'])} passages)")
    systems = {"exact": (prefix, False), "prefix": (prefix, True), "blend": (blend, True),
               "docfirst_exact": (docfirst, False), "docfirst_prefix": (docfirst, True)}
    names = list(systems)
    rows = []
    t_stage = time.perf_counter()
    for n, q in enumerate(data["measured"]):
        row = {"query": q["query"], "own": q["own"]}
        for name in names[n % len(names):] + names[: n % len(names)]:
            server, flag = systems[name]
            row[name] = server.rerank(q["query"], q["docs"], flag)
        row["spearman_blend"] = spearman(row["blend"]["scores"], row["exact"]["scores"])
        row["spearman_prefix"] = spearman(row["prefix"]["scores"], row["exact"]["scores"])
        row["spearman_docfirst"] = spearman(row["docfirst_prefix"]["scores"],
                                            row["docfirst_exact"]["scores"])
        rows.append(row)
        if (n + 1) % 4 == 0 or n + 1 == len(data["measured"]):
            log(f"rerank {n + 1}/{len(data['measured'])}: " + ", ".join(
                f"{k} {sum(r[k]['seconds'] for r in rows):.1f} s" for k in names)
                + f"; min Spearman blend {min(r['spearman_blend'] for r in rows):.4f}"
                + f" [{time.perf_counter() - t_stage:.0f} s]")
    t = {k: sum(r[k]["seconds"] for r in rows) for k in names}
    outcomes = [o for r in rows for o in r["blend"]["outcomes"]]
    diffs = [abs(a - b) for r in rows for a, b in zip(r["blend"]["scores"], r["exact"]["scores"])]
    top = lambda s: max(range(len(s)), key=s.__getitem__)  # noqa: E731
    return {
        "queries": len(rows),
        "documents_per_query": len(rows[0]["exact"]["scores"]) if rows else 0,
        "pool": len(data["passages"]),
        "warm_queries": len(data["warm"]),
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "seconds": t,
        "blend_vs_prefix": t["prefix"] / t["blend"],
        "blend_vs_exact": t["exact"] / t["blend"],
        "prefix_vs_exact": t["exact"] / t["prefix"],
        "spearman_blend_min": min(r["spearman_blend"] for r in rows),
        "spearman_blend_mean": statistics.mean(r["spearman_blend"] for r in rows),
        "spearman_prefix_min": min(r["spearman_prefix"] for r in rows),
        "docfirst_prefix_vs_prefix": t["prefix"] / t["docfirst_prefix"],
        "docfirst_prefix_vs_own_exact": t["docfirst_exact"] / t["docfirst_prefix"],
        "spearman_docfirst_min": min(r["spearman_docfirst"] for r in rows),
        "top1_agreement": sum(top(r["blend"]["scores"]) == top(r["exact"]["scores"])
                              for r in rows) / len(rows),
        "own_passage_top1_exact": sum(top(r["exact"]["scores"]) == r["own"] for r in rows) / len(rows),
        "max_abs_diff": max(diffs),
        "stale_vs_error": stale_vs_error(
            [(st, abs(b - e)) for r in rows
             for st, b, e, o in zip(r["blend"]["stale"], r["blend"]["scores"], r["exact"]["scores"],
                                    r["blend"]["outcomes"]) if o == "blend_hit"]),
        "rows": rows,
    }


def rerank_sweep(args, logdir: Path, flags: list[str], data: dict, stage: dict) -> list[dict]:
    """Other blend settings on the first `--sweep-queries` measured queries: for each, a fresh
    blend server with those flags and a fresh prefix server (the main run's have stored these
    very prompts), both warmed as the main ones were, each query asked of both in turn (order
    alternating); fidelity against the stage's exact scores (the exact forward is
    deterministic)."""
    out = []
    queries = data["measured"][: args.sweep_queries]
    for setting in [x.strip() for x in args.rerank_sweep.split(";") if x.strip()]:
        servers = {
            "blend": Reranker("sweep-blend", args.server, str(args.model),
                              [*flags, "--reuse", "blend", *setting.split()], args.threads,
                              logdir, 300),
            "prefix": Reranker("sweep-prefix", args.server, str(args.model), flags, args.threads,
                               logdir, 300),
        }
        peer_bench._SERVERS.extend(servers.values())
        try:
            for w in data["warm"]:
                for srv in servers.values():
                    srv.rerank(w["query"], w["docs"], True)
            t = {"prefix": 0.0, "blend": 0.0}
            rhos, outcomes = [], []
            for n, q in enumerate(queries):
                names = ["blend", "prefix"] if n % 2 == 0 else ["prefix", "blend"]
                for name in names:
                    got = servers[name].rerank(q["query"], q["docs"], True)
                    t[name] += got["seconds"]
                    if name == "blend":
                        rhos.append(spearman(got["scores"], stage["rows"][n]["exact"]["scores"]))
                        outcomes += got["outcomes"]
        finally:
            for srv in servers.values():
                srv.stop()
                peer_bench._SERVERS.remove(srv)
        rec = {"flags": setting, "queries": len(queries), "blend_vs_prefix": t["prefix"] / t["blend"],
               "spearman_min": min(rhos), "spearman_mean": statistics.mean(rhos),
               "blend_hits": outcomes.count("blend_hit"), "documents": len(outcomes)}
        log(f"rerank sweep {setting}: {rec['blend_vs_prefix']:.2f}x over prefix, Spearman min "
            f"{rec['spearman_min']:.4f} mean {rec['spearman_mean']:.4f}")
        out.append(rec)
    return out


def time_table(seconds: dict) -> list[str]:
    """Markdown rows of each system's summed seconds and its speed against `exact`."""
    rows = ["| system | seconds (sum) | vs exact |", "|---|---|---|"]
    rows += [f"| {k} | {t:.2f} | {seconds['exact'] / t:.2f}x |" for k, t in seconds.items()]
    return rows


def gate_line(stage: dict) -> list[str]:
    """A markdown line naming the blend gate a stage's server ran under, if any."""
    gate = (stage.get("decoder_blend") or {}).get("gate")
    if not gate:
        return []
    cal = gate["calibration"]
    return [f"Blend gate: stale deviation under {gate['stale_below']:.5f} at check layer "
            f"{gate['check_layer']} (share {gate['share']}), fitted on {cal['hits']} blend hits "
            f"({', '.join(f'{k} {n}' for k, n in cal['kinds'].items())}; {cal['hits_under_bound']} "
            f"under the bound, all within {gate['tolerance'] / 2} of exact); a hit over it is "
            "computed exactly (`blend_refused`)."]


def model_name(file: str) -> str:
    """A GGUF file's model, as reports name it (`SmolLM2-135M-Instruct.Q4_1.gguf` →
    `SmolLM2-135M-Instruct`)."""
    return file.removesuffix(".gguf").rsplit(".", 1)[0]


def markdown(result: dict, plot: str | None = None) -> str:
    m = result["machine"]
    lines = [
        f"# Approximate reuse on {model_name(result['model'])}: decoder blend (near-duplicate "
        "spam by prompt, reranking recurring documents) and the paper's map reuse (MMLU)",
        "",
        f"{m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB); model `{result['model']}`; "
        "every time is the client's wall time of one request (lookup, loading, forward).",
    ]
    s = result["stages"].get("spam")
    if s:
        lines += [
            "",
            "## Near-duplicate spam classified by prompt",
            "",
            f"Commit `{s['commit']}`, {s['date']}; {s['pairs']} mined pairs"
            + (f" (after the first {s['pair_offset']})" if s.get("pair_offset") else "")
            + f"; wall {s['wall_s']:.0f} s. "
            f"Blend server flags: `{s.get('blend_flags') or '(defaults)'}`. "
            f"Blend server outcomes: {s['outcomes']}.",
            *gate_line(s),
            "",
            *time_table(s["seconds"]),
        ]
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
        sv = s.get("stale_vs_error")
        if sv:
            lines.append(
                f"- the hits' stale deviation (`stale_deviation`) against their |p(yes) error|: "
                f"Spearman {sv['spearman']:.2f} over {sv['hits']} hits; largest error of the hits "
                "with stale deviation at most each quartile: " + ", ".join(
                    f"≤ {q['stale_at_most']:.3f}: {q['max_error']:.4f} ({q['hits']})"
                    for q in sv["max_error_under"]))
        gh = s.get("gate_holdout")
        if gh:
            lines += [
                "",
                "A `--decoder-blend-stale-below` bound fitted on the other mined groups (every "
                "calibration hit up to it within 0.01), judged on each held-out group from these "
                "rows (no rerun; a refused hit charged the prefix hit's time, which flatters it):",
                "",
                "| held out | pairs | bound | hits taken / ungated | within 0.02 | max error "
                "| labels agree | est. vs prefix |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for g in gh:
                lines.append(
                    f"| {g['held_out']} | {g['pairs']} | {g['bound']:.4f} ({g['calibration_hits']} hits) "
                    f"| {g['taken']} / {g['hits_ungated']} | {g['within_tolerance']:.3f} | "
                    f"{g['max_error']:.4f} | {g['label_agreement']:.3f} | {g['est_vs_prefix']:.2f}x |")
    r = result["stages"].get("rerank")
    if r:
        lines += [
            "",
            "## Reranking BoolQ passages that recur across queries",
            "",
            f"Commit `{r['commit']}`, {r['date']}; {r['queries']} measured queries x "
            f"{r['documents_per_query']} passages from a pool of {r['pool']} (after "
            f"{r['warm_queries']} warm-up queries over the pool"
            + (f", passages drawn with seed {r['seed']}" if r.get("seed") is not None else "")
            + (f", after the split's first {r['offset']} usable questions" if r.get("offset") else "")
            + f"); wall {r['wall_s']:.0f} s. "
            f"Blend server flags: `{r.get('blend_flags') or '(defaults)'}`. "
            f"Blend server outcomes (documents): {r['outcomes']}.",
            *gate_line(r),
            "",
            *time_table(r["seconds"]),
        ]
        lines += [
            "",
            "(`docfirst_*`: another server whose template puts the document before the query, "
            "so a recurring document is an exact stored prefix; its scores are its own template's, "
            "compared with its own exact run.)",
            "",
            f"- blend vs exact with prefix reuse: **{r['blend_vs_prefix']:.2f}x**",
            f"- Spearman of the blend scores with exact, per query: min **{r['spearman_blend_min']:.4f}**, "
            f"mean {r['spearman_blend_mean']:.4f} (prefix reuse: min {r['spearman_prefix_min']:.4f})",
            f"- top-1 agreement with exact {r['top1_agreement']:.3f}; largest score difference "
            f"{r['max_abs_diff']:.4f}; exact ranks the query's own passage first in "
            f"{r['own_passage_top1_exact']:.2f} of the queries",
            f"- the document-first template with prefix reuse: {r['docfirst_prefix_vs_prefix']:.2f}x "
            f"the query-first template's prefix reuse, {r['docfirst_prefix_vs_own_exact']:.2f}x its own "
            f"exact run, Spearman with its own exact min {r['spearman_docfirst_min']:.4f} (exact reuse)",
        ]
        sv = r.get("stale_vs_error")
        if sv:
            lines.append(
                f"- the blended documents' stale deviation against their |score error|: Spearman "
                f"{sv['spearman']:.2f} over {sv['hits']}; largest error under each quartile: "
                + ", ".join(f"≤ {q['stale_at_most']:.3f}: {q['max_error']:.4f} ({q['hits']})"
                            for q in sv["max_error_under"]))
        if r.get("sweep"):
            lines += [
                "",
                f"Other blend settings (each on the first {r['sweep'][0]['queries']} queries, a fresh "
                "blend server against a fresh prefix server in turn; the main run's setting is the "
                "default):",
                "",
                "| blend flags | vs prefix reuse | Spearman min | Spearman mean | blend hits |",
                "|---|---|---|---|---|",
            ]
            for w in r["sweep"]:
                lines.append(f"| `{w['flags']}` | {w['blend_vs_prefix']:.2f}x | {w['spearman_min']:.4f} "
                             f"| {w['spearman_mean']:.4f} | {w['blend_hits']}/{w['documents']} |")
    m = result["stages"].get("mmlu")
    if m:
        lines += llm_maps.markdown(m, plot)
    return "\n".join(lines) + "\n"


def headline(result: dict) -> dict:
    """The keys `benches/results/llm.json` carries (where the floors are read)."""
    out = {}
    s = result["stages"].get("spam")
    if s:
        out.update(llm_spam_blend_speedup=s["blend_vs_prefix"], llm_spam_agreement=s["label_agreement"],
                   llm_spam_within_002=s["within_0.02"])
    r = result["stages"].get("rerank")
    if r:
        out.update(llm_rerank_speedup=r["blend_vs_prefix"], llm_rerank_spearman=r["spearman_blend_min"],
                   llm_rerank_spearman_mean=r["spearman_blend_mean"])
    m = result["stages"].get("mmlu")
    if m:
        out.update(llm_maps.headline(m))
    return out


def merge_into(llm_json: Path, result: dict, source: str) -> list[str]:
    """Copies the headline keys into `llm_json`, naming the file and commits they come from."""
    data = json.loads(llm_json.read_text()) if llm_json.exists() else {}
    keys = headline(result)
    data.update(keys)
    for stage, r in result["stages"].items():
        data[f"llm_{stage}_source"] = {"file": source, "commit": r["commit"], "date": r["date"]}
    llm_json.write_text(json.dumps(data, indent=2) + "\n")
    return list(keys)


def start_mmlu_servers(args, flags: list[str], logdir: Path) -> dict:
    """The mmlu stage's servers: name → (server, cache flag); exact and prefix share one."""
    plain = llm_bench.MmluServer("exact", args.server, str(args.model), flags,
                                 args.threads, logdir, 300)
    peer_bench._SERVERS.append(plain)
    servers = {"exact": (plain, False), "prefix": (plain, True)}
    # a map entry is ~100 MB (a 620-token prompt): a few subjects' worth each
    maps_hot = ["--hot-mib", str(args.maps_hot_mib), "--hot-sizing", "fixed"]
    for name in args.maps_systems.split(","):
        server = llm_bench.MmluServer(
            name, args.server, str(args.model),
            [*maps_hot, "--decoder-maps", *args.maps_flags.split(), *llm_maps.MAP_SERVERS[name]],
            args.threads, logdir, 300)
        peer_bench._SERVERS.append(server)
        servers[name] = (server, True)
    return servers


def render(out: Path) -> None:
    """Rewrites OUT.json's derived analyses from its recorded rows, and OUT.md."""
    result = json.loads(out.with_suffix(".json").read_text())
    spam = result["stages"].get("spam")
    if spam:
        hits = [r for r in spam["rows"] if r["blend"]["outcome"] == "blend_hit"]
        spam["stale_vs_error"] = stale_vs_error(
            [(r["blend"].get("stale"), abs(r["blend"]["p_yes"] - r["exact"]["p_yes"])) for r in hits])
        spam["gate_holdout"] = gate_holdout(spam["rows"])
    mmlu = result["stages"].get("mmlu")
    sweep = llm_maps.gate_sweep(mmlu) if mmlu else None
    if sweep:
        mmlu["maps_gate_sweep"] = sweep
    write_report(out, result)
    log(f"rewrote {out}.json and {out}.md from their rows")


def write_report(out: Path, result: dict) -> str:
    """Writes OUT.json, OUT.md and, with an mmlu stage, its plot OUT-mmlu.svg; the report."""
    plot = None
    m = result["stages"].get("mmlu")
    if m and "attention_s" in m["systems"]["exact"]:
        svg = out.with_name(out.name + "-mmlu.svg")
        svg.write_text(llm_maps.plot_svg(m, model_name(result["model"])))
        plot = svg.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    report = markdown(result, plot)
    out.with_suffix(".md").write_text(report)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the GGUF file (llama)")
    p.add_argument("--server", required=True, help="the attncache-server binary")
    p.add_argument("--stages", default="spam,rerank,mmlu",
                   help="stages to run (comma-separated: spam, rerank, mmlu); the others are "
                        "kept from OUT.json when it has them")
    p.add_argument("--mmlu", type=Path, help="MMLU (scripts/fetch-mmlu); for stage mmlu")
    p.add_argument("--per-subject", type=int, default=5,
                   help="mmlu: test questions per subject (after its first validation question)")
    p.add_argument("--subjects", type=int, default=57, help="mmlu: subjects (alphabetical order)")
    p.add_argument("--maps-systems", default="maps,maps-rest,maps-prefix",
                   help="mmlu: the map servers to run beside exact and prefix (comma-separated: "
                        + ", ".join(llm_maps.MAP_SERVERS) + ")")
    p.add_argument("--record-per-subject", type=int, default=5,
                   help="mmlu: validation questions recorded per subject before its test "
                        "questions by the maps-val server (the others record the first)")
    p.add_argument("--maps-hot-mib", type=int, default=2048,
                   help="mmlu: --hot-mib of each map server (its stored maps' RAM; the "
                        "subjects run one after another, so a few entries suffice, but the "
                        "longest 5-shot prompts, the history subjects', take over 1 GiB each)")
    p.add_argument("--maps-flags", default="",
                   help="mmlu: more flags for both map servers, e.g. '--reuse-layers 10,11,12'")
    p.add_argument("--spam", type=Path, help="SpamAssassin (make fetch-spam); for stage spam")
    p.add_argument("--pairs", type=int, default=100, help="spam: mined pairs to serve (at most)")
    p.add_argument("--chars", type=int, default=1200, help="spam: characters of each body kept")
    p.add_argument("--boolq", type=Path, help="BoolQ (scripts/fetch-boolq); for stage rerank")
    p.add_argument("--rerank-queries", type=int, default=16, help="rerank: measured queries")
    p.add_argument("--rerank-pool", type=int, default=40, help="rerank: passages in the pool")
    p.add_argument("--rerank-docs", type=int, default=20, help="rerank: passages per query")
    p.add_argument("--seed", type=int, default=7, help="rerank: seed of the passages drawn")
    p.add_argument("--rerank-offset", type=int, default=0,
                   help="rerank: skip the first N usable BoolQ questions and passages (those a "
                        "blend gate was fitted on)")
    p.add_argument("--pair-offset", type=int, default=0,
                   help="spam: skip the first N mined pairs (those a blend gate was fitted on)")
    p.add_argument("--rerank-sweep", default="",
                   help="rerank: other blend settings (';'-separated flag sets, e.g. "
                        "'--decoder-blend-share 0.3;--decoder-blend-check-layer 8'), each tried "
                        "ungated on the first --sweep-queries queries (default: none)")
    p.add_argument("--sweep-queries", type=int, default=8, help="rerank: queries of each sweep setting")
    p.add_argument("--blend-flags", default="",
                   help="more flags for the blend server, e.g. '--decoder-blend-share 0.3'")
    p.add_argument("--hot-mib", type=int, default=4096,
                   help="--hot-mib of both servers (their prefix stores' RAM, fixed)")
    p.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS of the servers")
    p.add_argument("--out", default="benches/results/llm-eval", help="writes OUT.json and OUT.md")
    p.add_argument("--llm-json", default="benches/results/llm.json",
                   help="also copies the headline keys (llm_spam_*, llm_rerank_*) into this "
                        "file ('' for none)")
    p.add_argument("--render", action="store_true",
                   help="no run: recompute the analyses of OUT.json's recorded rows (stale "
                        "deviation against error, the held-out gate) and rewrite OUT.json and OUT.md")
    args = p.parse_args()
    if args.render:
        render(Path(args.out))
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - {"spam", "rerank", "mmlu"}
    if unknown:
        p.error(f"unknown stages: {', '.join(sorted(unknown))}")
    if "spam" in stages and not args.spam:
        p.error("stage spam needs --spam")
    if "rerank" in stages and not args.boolq:
        p.error("stage rerank needs --boolq")
    if "mmlu" in stages and not args.mmlu:
        p.error("stage mmlu needs --mmlu")
    # mmlu last: its map servers start once the other stages' servers are stopped
    stages = [x for x in stages if x != "mmlu"] + (["mmlu"] if "mmlu" in stages else [])
    bad = set(args.maps_systems.split(",")) - set(llm_maps.MAP_SERVERS)
    if bad:
        p.error(f"unknown --maps-systems: {', '.join(sorted(bad))}")
    out = Path(args.out)
    previous = {}
    if out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text()).get("stages", {})
    logdir = Path("target/llm-eval")
    logdir.mkdir(parents=True, exist_ok=True)
    commit = peer_bench.git_commit()
    now = lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    flags = ["--hot-mib", str(args.hot_mib), "--hot-sizing", "fixed"]
    done = {}
    try:
        if {"spam", "rerank"} & set(stages):
            prefix = Reranker("prefix", args.server, str(args.model), flags, args.threads,
                              logdir, 300)
            peer_bench._SERVERS.append(prefix)
            blend = Reranker("blend", args.server, str(args.model),
                             [*flags, "--reuse", "blend", *args.blend_flags.split()],
                             args.threads, logdir, 300)
            peer_bench._SERVERS.append(blend)
            docfirst = Reranker("docfirst", args.server, str(args.model),
                                [*flags, "--score-template", DOC_FIRST], args.threads, logdir, 300)
            peer_bench._SERVERS.append(docfirst)
        for name in stages:
            t0 = time.perf_counter()
            if name == "mmlu":
                # the spam and rerank stages are done (mmlu runs last): their servers' memory
                # goes before the map servers' (entries of ~100 MB to over 1 GiB) comes
                peer_bench.stop_servers()
                mmlu_servers = start_mmlu_servers(args, flags, logdir)
                qs = llm_maps.prompts(args.mmlu, args.per_subject, args.subjects,
                                      args.record_per_subject)
                log(f"mmlu: {len(qs)} prompts ({args.per_subject} test questions per subject)")
                stage = llm_maps.mmlu_stage(mmlu_servers, qs, log)
                stage.update(commit=commit, date=now(), wall_s=time.perf_counter() - t0,
                             maps_flags=args.maps_flags)
                done[name] = stage
                continue
            if name == "spam":
                pairs = mine_pairs(args.spam, args.chars, args.pair_offset + args.pairs)
                pairs = pairs[args.pair_offset:]
                log(f"{len(pairs)} mined near-duplicate pairs (after the first {args.pair_offset})")
                stage = spam_stage(prefix, blend, pairs)
            else:
                data = rerank_set(args.boolq, args.rerank_queries, args.rerank_pool,
                                  args.rerank_docs, args.seed, args.rerank_offset)
                stage = rerank_stage(prefix, blend, docfirst, data)
                stage["sweep"] = rerank_sweep(args, logdir, flags, data, stage)
            stage.update(commit=commit, date=now(), wall_s=time.perf_counter() - t0,
                         blend_flags=args.blend_flags, decoder_blend=blend.blend_setting(),
                         **({"pair_offset": args.pair_offset} if name == "spam"
                            else {"seed": args.seed, "offset": args.rerank_offset}))
            done[name] = stage
    finally:
        peer_bench.stop_servers()
    result = {
        "machine": peer_bench.machine(),
        "model": args.model.name,
        "stages": {**{k: v for k, v in previous.items() if k not in done}, **done},
    }
    result.update(headline(result))
    report = write_report(out, result)
    log(f"wrote {out}.json and {out}.md")
    if args.llm_json:
        keys = merge_into(Path(args.llm_json), result, f"{out}.json")
        log(f"copied {', '.join(keys)} into {args.llm_json}")
    print(report)


if __name__ == "__main__":
    main()

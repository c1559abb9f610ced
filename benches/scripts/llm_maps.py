"""The MMLU stage of `make llm-eval`: the AttnCache paper's map reuse on a decoder, with the
paper's protocol, against exact prefill and exact prefix reuse.

Prompts: per subject, the dev split's five examples as shots and then a question
(`llm_bench.mmlu_prompts`); the subject's first validation question goes first (it finds
nothing stored and is recorded, as the paper records the validation set first), then the
first ``--per-subject`` test questions. Each question is asked of every system in turn (the
starting system rotating question by question), one request at a time:

- ``exact``: the plain server, flag off (no reuse: the paper's baseline);
- ``prefix``: the same server, flag on: exact prefix reuse (the 5-shot head's K/V);
- ``maps``: a ``--decoder-maps`` server, flag on: the stored prompt sharing the longest exact
  prefix gives its attention maps in every layer, q/k are never projected (the paper's
  method; the rows after the shared prefix are the stored question's, stretched:
  approximate);
- ``maps-last``: ``--decoder-maps --decoder-maps-recompute-last 1``: as ``maps``, but the
  last row (the answer's) is computed exactly (k projected for every position, q for the
  last one);
- ``maps-rest``: ``--decoder-maps --decoder-maps-recompute-rest``: only the shared prefix's
  rows come from the maps, the question's rows are computed exactly (k projected for every
  position, q for the question's): within f16 rounding of exact.

Every time is the client's wall time of one ``POST /v1/classify`` over " A".." D" (lookup,
loading the maps and the forward included). Accuracy is the argmax letter against the
answer; the accuracy change is per subject, averaged over subjects (the paper's table).
"""

from __future__ import annotations

import statistics
import time

import llm_bench  # noqa: E402  (MMLU prompts, the paper's format)

SYSTEMS = ("exact", "prefix", "maps", "maps-last", "maps-rest")
# the map servers' extra flags
MAP_SERVERS = {"maps": [], "maps-last": ["--decoder-maps-recompute-last", "1"],
               "maps-rest": ["--decoder-maps-recompute-rest"]}


def mmlu_stage(servers: dict, prompts: list[dict], log) -> dict:
    """Runs `prompts` through `servers` (name → (MmluServer, cache flag)) in turn."""
    names = [n for n in SYSTEMS if n in servers]
    rec = {n: {"seconds": [], "warmup_seconds": [], "predictions": [], "outcomes": {},
               "maps_shared": []} for n in names}
    per_subject: dict = {}
    answers = []
    tokens = 0
    t_stage = time.perf_counter()
    for i, q in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            server, flag = servers[name]
            t0 = time.perf_counter()
            probs, report, n_tokens = server.answer(q["text"], flag)
            secs = time.perf_counter() - t0
            r = rec[name]
            if q["warmup"]:
                r["warmup_seconds"].append(secs)
                continue
            pred = max(range(4), key=lambda k: probs[k])
            r["seconds"].append(secs)
            r["predictions"].append(pred)
            outcome = report.get("outcome", "off")
            r["outcomes"][outcome] = r["outcomes"].get(outcome, 0) + 1
            if "maps_shared" in report:
                r["maps_shared"].append(report["maps_shared"] / n_tokens)
            s = per_subject.setdefault(q["subject"], {n: 0 for n in names} | {"questions": 0})
            s[name] += int(pred == q["answer"])
        if not q["warmup"]:
            tokens += n_tokens
            answers.append(q["answer"])
            per_subject[q["subject"]]["questions"] += 1
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):
            log(f"mmlu {i + 1}/{len(prompts)} ({q['subject']}): "
                + ", ".join(f"{n} {sum(rec[n]['seconds']) + sum(rec[n]['warmup_seconds']):.1f} s"
                            for n in names)
                + f" [{time.perf_counter() - t_stage:.0f} s]")
    n = len(answers)
    for name, r in rec.items():
        r["accuracy"] = sum(int(p == a) for p, a in zip(r["predictions"], answers)) / n
        r["total_s"] = sum(r["seconds"])
        r["total_with_warmup_s"] = r["total_s"] + sum(r["warmup_seconds"])
        r["agreement_with_exact"] = sum(
            int(p == e) for p, e in zip(r["predictions"], rec["exact"]["predictions"])) / n
        r["median_maps_shared"] = (statistics.median(r["maps_shared"])
                                   if r["maps_shared"] else None)
    t = {k: rec[k]["total_s"] for k in names}
    subjects = {k: {m: s[m] / s["questions"] for m in names} | {"questions": s["questions"]}
                for k, s in per_subject.items()}

    def change(system: str) -> float:
        """Mean over subjects of (accuracy of `system` − exact's), in points."""
        return 100 * statistics.mean(s[system] - s["exact"] for s in subjects.values())

    out = {"questions": n, "subjects": len(subjects),
           "warmup_questions": sum(1 for q in prompts if q["warmup"]),
           "prompt_tokens": tokens, "systems": rec, "per_subject": subjects,
           "prefix_speedup": t["exact"] / t["prefix"]}
    for m in ("maps", "maps-last", "maps-rest"):
        if m in t:
            key = m.replace("-", "_")
            out[f"{key}_speedup"] = t["exact"] / t[m]
            out[f"{key}_speedup_over_prefix"] = t["prefix"] / t[m]
            out[f"{key}_accuracy_change_pt"] = change(m)
            out[f"{key}_hit_rate"] = rec[m]["outcomes"].get("maps_hit", 0) / n
    return out


def markdown(s: dict) -> list[str]:
    """The stage's section of the report."""
    rec = s["systems"]
    lines = [
        "",
        "## MMLU 5-shot: the paper's map reuse",
        "",
        f"Commit `{s['commit']}`, {s['date']}; {s['questions']} test questions over "
        f"{s['subjects']} subjects ({s['prompt_tokens']} prompt tokens), each subject's first "
        f"validation question first (recorded, timed apart); wall {s['wall_s']:.0f} s. "
        "Each question through every system in turn, one request at a time.",
        "",
        "| system | accuracy | change vs exact (mean over subjects) | agreement with exact "
        "| seconds | vs exact | outcomes |",
        "|---|---|---|---|---|---|---|",
    ]
    t_exact = rec["exact"]["total_s"]
    for name, r in rec.items():
        key = name.replace("-", "_")
        change = s.get(f"{key}_accuracy_change_pt")
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | "
            + (f"{change:+.1f} pt" if change is not None else "—")
            + f" | {r['agreement_with_exact']:.3f} | {r['total_s']:.1f} | "
            f"{t_exact / r['total_s']:.2f}x | {r['outcomes']} |")
    shared = rec.get("maps", {}).get("median_maps_shared")
    lines += [
        "",
        "- the paper (Llama on MMLU, CPU): 1.2x end to end on average, accuracy change −3.3 to "
        "+0.9 pt, without lookup and loading in its timings; ours include both.",
    ]
    if "maps_speedup" in s:
        lines.append(
            f"- maps vs exact (the paper's comparison): **{s['maps_speedup']:.2f}x**, accuracy "
            f"change {s['maps_accuracy_change_pt']:+.1f} pt; on top of prefix reuse: "
            f"{s['maps_speedup_over_prefix']:.2f}x (exact prefix reuse alone: "
            f"{s['prefix_speedup']:.2f}x)"
            + (f"; a hit shares a median {shared:.2f} of its tokens with the stored prompt"
               if shared else ""))
    if "maps_last_speedup" in s:
        lines.append(
            f"- maps with the last row computed exactly: {s['maps_last_speedup']:.2f}x vs exact, "
            f"accuracy change {s['maps_last_accuracy_change_pt']:+.1f} pt, predictions agree "
            f"with exact on {rec['maps-last']['agreement_with_exact']:.3f}")
    if "maps_rest_speedup" in s:
        lines.append(
            f"- maps on the shared prefix only (question rows exact): "
            f"{s['maps_rest_speedup']:.2f}x vs exact, accuracy change "
            f"{s['maps_rest_accuracy_change_pt']:+.1f} pt, predictions agree with exact on "
            f"{rec['maps-rest']['agreement_with_exact']:.3f}")
    return lines


def headline(s: dict) -> dict:
    """The keys `benches/results/llm.json` carries."""
    out = {}
    if "maps_speedup" in s:
        out.update(llm_mmlu_acc_maps=s["systems"]["maps"]["accuracy"],
                   llm_mmlu_acc_exact_maps_run=s["systems"]["exact"]["accuracy"],
                   llm_maps_speedup=s["maps_speedup"],
                   llm_maps_speedup_over_prefix=s["maps_speedup_over_prefix"],
                   llm_maps_accuracy_change_pt=s["maps_accuracy_change_pt"])
    for m in ("maps_last", "maps_rest"):
        if f"{m}_speedup" in s:
            out.update({f"llm_{m}_speedup": s[f"{m}_speedup"],
                        f"llm_{m}_accuracy_change_pt": s[f"{m}_accuracy_change_pt"]})
    return out


def prompts(mmlu, per_subject: int, subjects: int) -> list[dict]:
    """The paper's protocol's prompts (see the module doc)."""
    return llm_bench.mmlu_prompts(mmlu, per_subject, subjects)

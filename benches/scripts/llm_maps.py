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
- ``maps-val``: as ``maps``, but the server records each subject's first
  ``--record-per-subject`` validation questions (the paper records the validation set), so
  a hit takes the stored question sharing the longest prefix, then nearest in length;
- ``maps-last``: ``--decoder-maps --decoder-maps-recompute-last 1``: as ``maps``, but the
  last row (the answer's) is computed exactly (k projected for every position, q for the
  last one);
- ``maps-rest``: ``--decoder-maps --decoder-maps-recompute-rest``: only the shared prefix's
  rows come from the maps, the question's rows are computed exactly (k projected for every
  position, q for the question's): within f16 rounding of exact;
- ``maps-prefix``: ``--decoder-maps --decoder-maps-over-prefix``: map reuse on top of exact
  prefix reuse: the 5-shot head's K/V from the prefix store (exact), and in every layer the
  question's rows from the stored prompt's maps (approximate, as ``maps``), compared with
  ``prefix``: the gain of maps over prefix reuse.

Every time is the client's wall time of one ``POST /v1/classify`` over " A".." D" (lookup,
loading the maps and the forward included). After each request (untimed) the server's
``/info`` gives the request's attention-kernel seconds (the exact kernel's and the stored-map
layers': scores, softmax and P·V, projections left out on both sides) and its lookup
seconds: the attention-only speed-up and the lookup + loading share (the maps stay in RAM:
loading is taking a reference; converting them from f16 is in the kernel). Accuracy is the
argmax letter against the answer; the accuracy change is per subject, averaged over subjects
(the paper's table), with a 95% interval from resampling each subject's questions (paired:
the same questions for both systems). ``--record-per-subject N`` records N validation
questions per subject in the ``maps-val`` server. A gate sweep (``gate_sweep``) estimates
from the ``maps`` server's per-question figures what a stricter
``--decoder-maps-min-shared`` would give.
"""

from __future__ import annotations

import random
import statistics
import time

import llm_bench  # noqa: E402  (MMLU prompts, the paper's format)

# the paper's per-subject figures on CPU (Llama, MMLU): attention and end-to-end speed-ups
# and accuracy change, as ranges over its subjects (design notes: its timings leave out
# the projector, the search and loading the maps)
PAPER = {"attention": (2.05, 2.44), "end_to_end": (1.13, 1.22), "accuracy_pt": (-3.3, 0.9)}

SYSTEMS = ("exact", "prefix", "maps", "maps-val", "maps-last", "maps-rest", "maps-prefix")
# the map servers' extra flags
MAP_SERVERS = {"maps": [], "maps-val": [], "maps-last": ["--decoder-maps-recompute-last", "1"],
               "maps-rest": ["--decoder-maps-recompute-rest"],
               "maps-prefix": ["--decoder-maps-over-prefix"]}
# the map servers that record every validation question of `--record-per-subject` (the
# others record each subject's first, as exact and prefix do)
RECORD_ALL = {"maps-val"}
MAP_KEYS = tuple(m.replace("-", "_") for m in MAP_SERVERS)


def kernel_seconds(server) -> tuple[float, float]:
    """The server's attention-kernel seconds (exact and stored-map layers) and map-lookup
    seconds so far, from `/info`."""
    info = server.info()
    att = info.get("attention_seconds", {})
    counts = (info["attn_cache"].get("decoder_maps") or {}).get("counts") or {}
    return att.get("exact", 0.0) + att.get("maps", 0.0), counts.get("lookup_ns", 0) / 1e9


def mmlu_stage(servers: dict, prompts: list[dict], log) -> dict:
    """Runs `prompts` through `servers` (name → (MmluServer, cache flag)) in turn."""
    names = [n for n in SYSTEMS if n in servers]
    rec = {n: {"seconds": [], "warmup_seconds": [], "predictions": [], "outcomes": {},
               "maps_shared": [], "attention_seconds": [], "lookup_seconds": []} for n in names}
    # each server's kernel counters after its last request
    last = {id(srv): kernel_seconds(srv) for srv, _ in servers.values()}
    answers, subjects_of = [], []
    tokens = 0
    t_stage = time.perf_counter()
    for i, q in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            if q.get("record_only") and name not in RECORD_ALL:
                continue
            server, flag = servers[name]
            t0 = time.perf_counter()
            probs, report, n_tokens = server.answer(q["text"], flag)
            secs = time.perf_counter() - t0
            now = kernel_seconds(server)
            attention, lookup = (a - b for a, b in zip(now, last[id(server)]))
            last[id(server)] = now
            r = rec[name]
            if q["warmup"]:
                r["warmup_seconds"].append(secs)
                continue
            pred = max(range(4), key=lambda k: probs[k])
            r["seconds"].append(secs)
            r["attention_seconds"].append(attention)
            r["lookup_seconds"].append(lookup)
            r["predictions"].append(pred)
            outcome = report.get("outcome", "off")
            r["outcomes"][outcome] = r["outcomes"].get(outcome, 0) + 1
            # per question: the share of its tokens shared with the stored prompt (None: no hit)
            r["maps_shared"].append(report["maps_shared"] / n_tokens
                                    if "maps_shared" in report else None)
        if not q["warmup"]:
            tokens += n_tokens
            answers.append(q["answer"])
            subjects_of.append(q["subject"])
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
        r["attention_s"] = sum(r["attention_seconds"])
        r["lookup_s"] = sum(r["lookup_seconds"])
        r["agreement_with_exact"] = sum(
            int(p == e) for p, e in zip(r["predictions"], rec["exact"]["predictions"])) / n
        shares = [x for x in r["maps_shared"] if x is not None]
        r["median_maps_shared"] = statistics.median(shares) if shares else None
    by_subject: dict[str, list[int]] = {}
    for j, subject in enumerate(subjects_of):
        by_subject.setdefault(subject, []).append(j)
    subjects = {}
    for subject, idx in by_subject.items():
        row = {"questions": len(idx)}
        for m in names:
            r = rec[m]
            row[m] = sum(int(r["predictions"][j] == answers[j]) for j in idx) / len(idx)
            row[f"{m}_seconds"] = sum(r["seconds"][j] for j in idx)
            row[f"{m}_attention_seconds"] = sum(r["attention_seconds"][j] for j in idx)
        subjects[subject] = row

    def correct(system: str) -> list[int]:
        return [int(p == a) for p, a in zip(rec[system]["predictions"], answers)]

    out = {"questions": n, "subjects": len(subjects),
           "warmup_questions": sum(1 for q in prompts if q["warmup"] and not q.get("record_only")),
           "recorded_per_subject": 1 + max((sum(1 for q in prompts if q.get("record_only")
                                                and q["subject"] == s) for s in subjects),
                                           default=0),
           "prompt_tokens": tokens, "systems": rec, "per_subject": subjects,
           # per question, for analyses after the run (the gate sweep)
           "answers": answers, "subjects_of": subjects_of,
           "warmup_subjects": [q["subject"] for q in prompts
                               if q["warmup"] and not q.get("record_only")],
           "prefix_speedup": rec["exact"]["total_s"] / rec["prefix"]["total_s"],
           "prefix_attention_speedup": rec["exact"]["attention_s"] / rec["prefix"]["attention_s"],
           "paper": PAPER}
    for m in MAP_SERVERS:
        if m in rec:
            key = m.replace("-", "_")
            r = rec[m]
            change, interval = accuracy_change(by_subject, correct("exact"), correct(m))
            out[f"{key}_speedup"] = rec["exact"]["total_s"] / r["total_s"]
            out[f"{key}_speedup_over_prefix"] = rec["prefix"]["total_s"] / r["total_s"]
            out[f"{key}_attention_speedup"] = rec["exact"]["attention_s"] / r["attention_s"]
            out[f"{key}_lookup_share"] = r["lookup_s"] / r["total_s"]
            out[f"{key}_accuracy_change_pt"] = change
            out[f"{key}_accuracy_change_ci95_pt"] = interval
            out[f"{key}_hit_rate"] = r["outcomes"].get("maps_hit", 0) / n
    sweep = gate_sweep(out)
    if sweep:
        out["maps_gate_sweep"] = sweep
    return out


# the least shared shares the gate sweep tries (the server's --decoder-maps-min-shared)
GATE_SHARES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def gate_sweep(s: dict) -> list[dict] | None:
    """What a stricter `--decoder-maps-min-shared` gate would give, estimated from a stage's
    own per-question figures (`None` without them): a question the ``maps`` server hit but
    whose shared share is under the bound is refused: it takes the exact server's answer and
    time times its subject's recording cost (the maps server's time over the exact server's
    on that subject's recorded validation question, same head, similar length), since a
    refused prompt is computed exactly and recorded. A question the maps server missed keeps
    its own answer and time. Not in the estimate: later questions hitting what a refusal
    recorded."""
    rec = s["systems"]
    if "maps" not in rec or "answers" not in s:
        return None
    exact, maps = rec["exact"], rec["maps"]
    answers, subjects_of = s["answers"], s["subjects_of"]
    if len(maps["maps_shared"]) != len(answers):
        return None
    record_cost = {subject: m / e for subject, m, e in zip(
        s["warmup_subjects"], maps["warmup_seconds"], exact["warmup_seconds"])}
    by_subject: dict[str, list[int]] = {}
    for j, subject in enumerate(subjects_of):
        by_subject.setdefault(subject, []).append(j)
    exact_correct = [int(p == a) for p, a in zip(exact["predictions"], answers)]
    rows = []
    for bound in GATE_SHARES:
        preds, secs, hits = [], [], 0
        for j, share in enumerate(maps["maps_shared"]):
            if share is None or share >= bound:
                hits += share is not None
                preds.append(maps["predictions"][j])
                secs.append(maps["seconds"][j])
            else:
                preds.append(exact["predictions"][j])
                secs.append(exact["seconds"][j] * record_cost.get(subjects_of[j], 1.0))
        change, interval = accuracy_change(by_subject, exact_correct,
                                           [int(p == a) for p, a in zip(preds, answers)])
        rows.append({"min_shared": bound, "hits": hits,
                     "speedup": exact["total_s"] / sum(secs),
                     "accuracy_change_pt": change, "accuracy_change_ci95_pt": interval,
                     "agreement_with_exact": sum(
                         int(p == e) for p, e in zip(preds, exact["predictions"])) / len(preds)})
    return rows


def accuracy_change(by_subject: dict, exact: list[int], other: list[int],
                    resamples: int = 2000) -> tuple[float, list[float] | None]:
    """The mean over subjects of (accuracy of `other` − `exact`'s) in points, and its 95%
    interval from resampling each subject's questions with replacement (paired); `None`
    when a subject has a single question (resampling it cannot vary)."""
    diff = [o - e for o, e in zip(other, exact)]

    def mean_change(groups) -> float:
        return 100 * statistics.mean(statistics.mean(diff[j] for j in g) for g in groups)

    groups = list(by_subject.values())
    if min(len(g) for g in groups) < 2:
        return mean_change(groups), None
    rng = random.Random(0)
    draws = sorted(mean_change([rng.choices(g, k=len(g)) for g in groups])
                   for _ in range(resamples))
    return mean_change(groups), [draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]]


def markdown(s: dict, plot: str | None = None) -> list[str]:
    """The stage's section of the report; `plot`: the figure's file name beside it."""
    rec = s["systems"]
    recorded = s.get("recorded_per_subject", 1)
    lines = [
        "",
        "## MMLU 5-shot: the paper's map reuse",
        "",
        f"Commit `{s['commit']}`, {s['date']}; {s['questions']} test questions over "
        f"{s['subjects']} subjects ({s['prompt_tokens']} prompt tokens), each subject's first "
        "validation question first (recorded, timed apart"
        + (f"; maps-val records the first {recorded}" if recorded > 1 else "")
        + f"); wall {s['wall_s']:.0f} s. Each question through every system in turn, one "
        "request at a time.",
        "",
        "| system | accuracy | change vs exact (mean over subjects, 95% interval) | agreement "
        "with exact | seconds | vs exact | attention only vs exact | lookup share | outcomes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    exact = rec["exact"]
    for name, r in rec.items():
        key = name.replace("-", "_")
        change = s.get(f"{key}_accuracy_change_pt")
        ci = s.get(f"{key}_accuracy_change_ci95_pt")
        att = (f"{exact['attention_s'] / r['attention_s']:.2f}x"
               if r.get("attention_s") else "—")
        lookup = f"{r['lookup_s'] / r['total_s']:.2%}" if r.get("lookup_s") else "—"
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | "
            + (f"{change:+.1f} pt" if change is not None else "—")
            + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
            + f" | {r['agreement_with_exact']:.3f} | {r['total_s']:.1f} | "
            f"{exact['total_s'] / r['total_s']:.2f}x | {att} | {lookup} | {r['outcomes']} |")
    shared = rec.get("maps", {}).get("median_maps_shared")
    paper = s.get("paper", PAPER)
    lines += [
        "",
        f"- the paper (Llama on MMLU, CPU, per subject): attention {paper['attention'][0]}–"
        f"{paper['attention'][1]}x, end to end {paper['end_to_end'][0]}–{paper['end_to_end'][1]}x, "
        f"accuracy change {paper['accuracy_pt'][0]:+} to {paper['accuracy_pt'][1]:+} pt, without "
        "lookup and loading in its timings; ours include both. Attention only: the attention "
        "kernels' seconds as the server counts them (scores, softmax, P·V; the projections are "
        "left out on both sides, so the q/k projections maps skip count only end to end).",
    ]
    if "maps_speedup" in s:
        lines.append(
            f"- maps vs exact (the paper's comparison): **{s['maps_speedup']:.2f}x** end to end, "
            + (f"{s['maps_attention_speedup']:.2f}x attention only, "
               if "maps_attention_speedup" in s else "")
            + f"accuracy change {s['maps_accuracy_change_pt']:+.1f} pt; in place of prefix reuse: "
            f"{s['maps_speedup_over_prefix']:.2f}x its speed (exact prefix reuse alone: "
            f"{s['prefix_speedup']:.2f}x)"
            + (f"; a hit shares a median {shared:.2f} of its tokens with the stored prompt"
               if shared else ""))
    if "maps_val_speedup" in s:
        lines.append(
            f"- maps with every recorded validation question stored (the nearest in length "
            f"taken): {s['maps_val_speedup']:.2f}x vs exact, accuracy change "
            f"{s['maps_val_accuracy_change_pt']:+.1f} pt, predictions agree with exact on "
            f"{rec['maps-val']['agreement_with_exact']:.3f}")
    if "maps_last_speedup" in s:
        lines.append(
            f"- maps with the last row computed exactly: {s['maps_last_speedup']:.2f}x vs exact, "
            f"accuracy change {s['maps_last_accuracy_change_pt']:+.1f} pt, predictions agree "
            f"with exact on {rec['maps-last']['agreement_with_exact']:.3f}")
    if "maps_prefix_speedup" in s:
        lines.append(
            f"- maps on top of exact prefix reuse (the head from the prefix store, the question's "
            f"rows from the maps): **{s['maps_prefix_speedup_over_prefix']:.2f}x** over prefix "
            f"reuse alone ({s['maps_prefix_speedup']:.2f}x vs exact), "
            + (f"{s['maps_prefix_attention_speedup'] / s['prefix_attention_speedup']:.2f}x "
               "its attention kernels', " if s.get("maps_prefix_attention_speedup") else "")
            + f"accuracy change {s['maps_prefix_accuracy_change_pt']:+.1f} pt, predictions "
            f"agree with exact on {rec['maps-prefix']['agreement_with_exact']:.3f}")
    if "maps_rest_speedup" in s:
        lines.append(
            f"- maps on the shared prefix only (question rows exact): "
            f"{s['maps_rest_speedup']:.2f}x vs exact, accuracy change "
            f"{s['maps_rest_accuracy_change_pt']:+.1f} pt, predictions agree with exact on "
            f"{rec['maps-rest']['agreement_with_exact']:.3f}")
    if s.get("maps_gate_sweep"):
        lines += [
            "",
            "A stricter gate (`--decoder-maps-min-shared`), estimated from this run's own "
            "per-question figures: a hit under the bound taken as the exact server answered "
            "it, at the exact server's time times its subject's recording cost (a refused "
            "prompt is computed exactly and recorded; later questions hitting what it recorded "
            "are not in the estimate):",
            "",
            "| least shared share | hits | vs exact | accuracy change (95% interval) | "
            "predictions as exact |",
            "|---|---|---|---|---|",
        ]
        for g in s["maps_gate_sweep"]:
            ci = g["accuracy_change_ci95_pt"]
            lines.append(
                f"| {g['min_shared']} | {g['hits']} | {g['speedup']:.2f}x | "
                f"{g['accuracy_change_pt']:+.1f} pt"
                + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
                + f" | {g['agreement_with_exact']:.3f} |")
    if plot:
        lines += ["", f"![per-subject speed-ups and accuracy change beside the paper's]({plot})"]
    return lines


def headline(s: dict) -> dict:
    """The keys `benches/results/llm.json` carries."""
    out = {}
    if "maps_speedup" in s:
        out.update(llm_mmlu_acc_maps=s["systems"]["maps"]["accuracy"],
                   llm_mmlu_acc_exact_maps_run=s["systems"]["exact"]["accuracy"],
                   llm_maps_speedup=s["maps_speedup"],
                   llm_maps_instead_of_prefix=s["maps_speedup_over_prefix"],
                   llm_maps_accuracy_change_pt=s["maps_accuracy_change_pt"])
    if "maps_prefix_speedup" in s:
        # the "gain of maps on top of prefix reuse"
        out["llm_maps_speedup_over_prefix"] = s["maps_prefix_speedup_over_prefix"]
    for m in MAP_KEYS:
        if m != "maps" and f"{m}_speedup" in s:
            out.update({f"llm_{m}_speedup": s[f"{m}_speedup"],
                        f"llm_{m}_accuracy_change_pt": s[f"{m}_accuracy_change_pt"]})
        for extra in ("attention_speedup", "lookup_share"):
            if f"{m}_{extra}" in s:
                out[f"llm_{m}_{extra}"] = s[f"{m}_{extra}"]
    return out


def plot_svg(s: dict, model: str) -> str:
    """Per subject, the map systems' end-to-end and attention-only speed-ups over exact and
    their accuracy change, each panel with the paper's per-subject range shaded beside."""
    subjects = sorted(s["per_subject"])
    # maps over prefix reuse is compared with prefix reuse, not drawn against exact here
    maps = [m for m in MAP_SERVERS if m in s["systems"] and m != "maps-prefix"]
    colours = {"maps": "#1f77b4", "maps-val": "#9467bd", "maps-last": "#ff7f0e",
               "maps-rest": "#2ca02c"}
    rows = s["per_subject"]

    def ratio(subject, m, what):
        r = rows[subject]
        den = r.get(f"{m}_{what}")
        return r[f"exact_{what}"] / den if den else None

    panels = [
        ("end to end vs exact (x)", "end_to_end",
         {m: [ratio(x, m, "seconds") for x in subjects] for m in maps}),
        ("attention only vs exact (x)", "attention",
         {m: [ratio(x, m, "attention_seconds") for x in subjects] for m in maps}),
        ("accuracy change vs exact (pt)", "accuracy_pt",
         {m: [100 * (rows[x][m] - rows[x]["exact"]) for x in subjects] for m in maps}),
    ]
    width, left, right, ph, gap, top = 900, 70, 150, 170, 40, 40
    height = top + len(panels) * (ph + gap) + 110
    step = (width - left - right) / max(len(subjects), 1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           "font-family='sans-serif' font-size='11'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{left}' y='20' font-size='14'>MMLU 5-shot, {model}: map reuse per "
           f"subject ({s['questions']} questions, commit {s['commit']}); shaded: the paper's "
           "range over its subjects</text>"]
    for k, (title, paper_key, series) in enumerate(panels):
        y0 = top + k * (ph + gap)
        values = [v for vs in series.values() for v in vs if v is not None]
        lo_p, hi_p = s.get("paper", PAPER)[paper_key]
        lo = min(values + [lo_p, 0.0 if paper_key == "accuracy_pt" else 1.0])
        hi = max(values + [hi_p])
        pad = 0.05 * (hi - lo or 1)
        lo, hi = lo - pad, hi + pad

        def y(v, y0=y0, lo=lo, hi=hi):
            return y0 + ph - (v - lo) / (hi - lo) * ph

        out.append(f"<rect x='{left}' y='{y0}' width='{width - left - right}' height='{ph}' "
                   "fill='none' stroke='#999'/>")
        out.append(f"<rect x='{left}' y='{y(hi_p):.1f}' width='{width - left - right}' "
                   f"height='{y(lo_p) - y(hi_p):.1f}' fill='#d62728' fill-opacity='0.15'/>")
        base = 0.0 if paper_key == "accuracy_pt" else 1.0
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(base):.1f}' y2='{y(base):.1f}' "
                   "stroke='#555' stroke-dasharray='3,3'/>")
        out.append(f"<text x='{left}' y='{y0 - 6}'>{title}</text>")
        for v in (lo + pad, hi - pad):
            out.append(f"<text x='{left - 6}' y='{y(v) + 4:.1f}' text-anchor='end'>{v:.2f}</text>")
        for m, vs in series.items():
            for i, v in enumerate(vs):
                if v is not None:
                    out.append(f"<circle cx='{left + (i + 0.5) * step:.1f}' cy='{y(v):.1f}' r='2.6' "
                               f"fill='{colours[m]}' fill-opacity='0.8'/>")
            present = [v for v in vs if v is not None]
            if not present:
                continue
            mean = statistics.mean(present)
            out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(mean):.1f}' "
                       f"y2='{y(mean):.1f}' stroke='{colours[m]}' stroke-width='1'/>")
        out.append(f"<text x='{width - right + 6}' y='{y((lo_p + hi_p) / 2) + 4:.1f}' "
                   "fill='#d62728'>paper</text>")
    ly = top + len(panels) * (ph + gap) - 10
    for j, m in enumerate(maps):
        out.append(f"<circle cx='{left + 10 + 150 * j}' cy='{ly}' r='4' fill='{colours[m]}'/>")
        out.append(f"<text x='{left + 18 + 150 * j}' y='{ly + 4}'>{m} (line: mean)</text>")
    out.append(f"<text x='{left}' y='{ly + 24}'>subjects in alphabetical order, left to right; "
               "accuracy per subject moves in steps of 100/questions pt</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def prompts(mmlu, per_subject: int, subjects: int, record: int = 1) -> list[dict]:
    """The paper's protocol's prompts (see the module doc)."""
    return llm_bench.mmlu_prompts(mmlu, per_subject, subjects, record)

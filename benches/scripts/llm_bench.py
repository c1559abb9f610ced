"""`make llm-bench`: exact prefill of a GGUF decoder, attncache-server against its peers.

One GGUF file (SmolLM2-135M-Instruct Q4_1 by default), the same prompts, one machine, one
run; every system measured in turn, the starting system rotating each round, so slow drifts
of the machine hit all of them alike. Only one system works at a time.

Systems:

- ``fast``: attncache-server (``--exact-attention fast``, the default): weights dequantized
  once at load to f32, our exact attention kernel;
- ``stock``: attncache-server ``--exact-attention stock``: mistral.rs 0.8.1's own forward on
  the quantized weights (8-bit activations per matmul);
- ``torch``: PyTorch + transformers reading the same GGUF (dequantized to f32), in this
  process, ``torch.set_num_threads(--threads)``, ``logits_to_keep=1``;
- ``llamacpp``: llama.cpp through llama-cpp-python (built from its source package by
  ``scripts/setup-llm-peers``), in this process, ``n_threads=--threads``, the file's own
  quantized weights.

Every call is a prefill of the whole prompt and the next token's logits, nothing cached
between calls, every system reading the same token ids: the servers answer ``POST
/v1/classify`` (``input`` as token ids) with the labels " yes" / " no"
(mistral.rs's prefix cacher is off in attncache-server); torch runs one forward; llama.cpp
is reset and evaluates the tokens. The probabilities of " yes" and " no" are kept for every
system, so the report also says how far each is from torch (the f32 reference).

Stages: ``single-N`` (one prompt of N tokens, N in --lengths), ``batch-16`` (16 prompts of
--batch-tokens tokens: one request to the servers, one [16, L] forward in torch; llama.cpp
evaluates them one after another, its Python API having no batched prefill), and
``concurrent-8`` (``fast`` only: 8 client threads each sending one prompt per request for
--concurrent-secs, against one client doing the same alone).

Prompts are windows of English prose cut to an exact token count with the model's tokenizer
(transformers'), which every system then reads as ids; the servers' ``usage.prompt_tokens``
is checked against it.

The defaults fit in about 17 minutes here (2 cores): stock's batch of 16 (about 10 minutes
by itself; stock's time per token is flat from 50 tokens to the batch, so the single stages
already give its ratio) is left out, MMLU takes 5 test questions per subject. ``--full``
runs everything as the committed full run did: stock on the batch, two batch calls per
system, 8 questions per subject, 60 s per side of the 8-client stage (about 34 minutes).

Writes ``OUT.json`` (ratios other / fast at the top: > 1 means fast is faster) and
``OUT.md``. Progress goes to stderr, one line per call.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import datetime
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_bench  # noqa: E402  (Server, machine facts, prose: shared with make peer-bench)

LABELS = [" yes", " no"]
QUESTION = "\n\nIs the text above about software? Answer yes or no. Answer:"
STAGE_ORDER = ("fast", "stock", "torch", "llamacpp")


def log(msg: str) -> None:
    """A plain progress line on stderr."""
    print(f"llm-bench: {msg}", file=sys.stderr, flush=True)


class ClassifyServer(peer_bench.Server):
    """attncache-server serving the decoder; ``prefill`` is one ``POST /v1/classify``."""

    def prefill(self, prompts: list[list[int]]) -> tuple[list[list[float]], int]:
        """The label probabilities of each prompt (token ids) and the tokens the server read."""
        body = json.dumps({"input": prompts, "labels": LABELS}).encode()
        conn = self._conn()
        try:
            conn.request("POST", "/v1/classify", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, ConnectionError):
            conn.close()
            self._local.conn = None
            raise
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:500]!r}")
        out = json.loads(data)
        probs = [d["probs"] for d in out["data"]]
        return probs, out["usage"]["prompt_tokens"]


class Torch:
    """transformers' causal LM reading the GGUF, f32, in this process."""

    def __init__(self, gguf: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        self.label_ids = [self.one_token(w) for w in LABELS]

    def one_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise SystemExit(f"label {word!r} is {len(ids)} tokens for this model")
        return ids[0]

    def prefill(self, ids: list[list[int]]) -> list[list[float]]:
        t = self.torch
        with t.inference_mode():
            logits = self.model(t.tensor(ids), logits_to_keep=1).logits[:, -1, :]
        return t.softmax(logits[:, self.label_ids], dim=-1).tolist()


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the GGUF's own quantized weights, in this process."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, label_ids: list[int]):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
        self.label_ids = label_ids

    def prefill(self, ids: list[list[int]]) -> list[list[float]]:
        import numpy as np

        out = []
        for seq in ids:
            self.llm.reset()
            self.llm.eval(seq)
            # logits_all=False: llama.cpp computed the last position's row only
            row = self.llm._ctx.get_logits_ith(-1)
            logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).astype(np.float64)
            z = logits[self.label_ids]
            e = np.exp(z - z.max())
            out.append((e / e.sum()).tolist())
        return out


def prompts(tokenizer, n_tokens: int, count: int) -> tuple[list[str], list[list[int]]]:
    """`count` different prompts of exactly `n_tokens` tokens: prose windows + QUESTION."""
    prose = " ".join(peer_bench.PROSE)
    words = prose.split()
    tail = tokenizer.encode(QUESTION, add_special_tokens=False)
    texts, ids = [], []
    for i in range(count * 4):  # a window whose cut merges into another length is skipped
        if len(ids) == count:
            break
        start = (i * 37) % len(words)
        body = " ".join((words * (2 + n_tokens // max(len(words), 1)))[start:start + 2 * n_tokens])
        body_ids = tokenizer.encode(body, add_special_tokens=False)[: n_tokens - len(tail)]
        text = tokenizer.decode(body_ids) + QUESTION
        seq = tokenizer.encode(text, add_special_tokens=False)
        if len(seq) != n_tokens:  # a merge across the cut: trim and try once more
            body_ids = body_ids[: len(body_ids) - (len(seq) - n_tokens)]
            text = tokenizer.decode(body_ids) + QUESTION
            seq = tokenizer.encode(text, add_special_tokens=False)
        if len(seq) != n_tokens:
            continue
        texts.append(text)
        ids.append(seq)
    if len(ids) < count:
        raise SystemExit(f"could not cut {count} prompts of exactly {n_tokens} tokens")
    return texts, ids


class Bench:
    def __init__(self, args, systems: dict):
        self.args = args
        self.systems = systems
        self.stages: dict = {}

    def call(self, name: str, texts: list[str], ids: list[list[int]]):
        system = self.systems[name]
        t0 = time.perf_counter()
        if isinstance(system, ClassifyServer):
            probs, served_tokens = system.prefill(ids)
            if served_tokens != sum(len(s) for s in ids):
                raise RuntimeError(f"{name} read {served_tokens} tokens, not {sum(len(s) for s in ids)}")
        else:
            probs, served_tokens = system.prefill(ids), sum(len(s) for s in ids)
        return time.perf_counter() - t0, probs, served_tokens

    def stage(self, stage: str, texts: list[str], ids: list[list[int]], reps: dict) -> None:
        """Rounds of one call per system (rotating start), `reps[name]` calls each."""
        names = [n for n in STAGE_ORDER if n in self.systems and reps.get(n, 0) > 0]
        rec = {"prompts": len(texts), "tokens_each": [len(s) for s in ids][:1],
               "systems": {n: {"seconds": [], "served_tokens": None, "probs": None} for n in names}}
        rounds = max(reps[n] for n in names)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                if len(rec["systems"][name]["seconds"]) >= reps[name]:
                    continue
                secs, probs, served = self.call(name, texts, ids)
                s = rec["systems"][name]
                s["seconds"].append(secs)
                s["served_tokens"], s["probs"] = served, probs
                log(f"{stage} round {r + 1}/{rounds} {name}: {secs:.3f} s ({served} tokens)")
        ref = rec["systems"].get("torch", {}).get("probs")
        for name, s in rec["systems"].items():
            s["median_s"] = statistics.median(s["seconds"])
            if ref is not None:
                s["max_abs_p_diff_vs_torch"] = max(
                    abs(a - b) for pa, pb in zip(s["probs"], ref) for a, b in zip(pa, pb))
        self.stages[stage] = rec

    def concurrent(self, prompts: list[list[int]], secs: float, clients: int, stage: str) -> None:
        """Requests/s of `fast` with `clients` threads, against one client alone."""
        server = self.systems["fast"]
        rec = {}
        for label, n in (("one-at-a-time", 1), (f"{clients}-clients", clients)):
            done, lat = [0], []
            lock = threading.Lock()
            stop = time.monotonic() + secs

            def worker(k: int) -> None:
                i = k
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    server.prefill([prompts[i % len(prompts)]])
                    with lock:
                        done[0] += 1
                        lat.append(time.perf_counter() - t0)
                    i += n

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                list(pool.map(worker, range(n)))
            wall = time.perf_counter() - t0
            rec[label] = {"requests": done[0], "seconds": wall, "requests_per_s": done[0] / wall,
                          "latency_p50_s": statistics.median(lat) if lat else None}
            log(f"{stage} {label}: {done[0]} requests in {wall:.1f} s "
                f"({done[0] / wall:.2f}/s)")
        rec["gain"] = rec[f"{clients}-clients"]["requests_per_s"] / rec["one-at-a-time"]["requests_per_s"]
        rec["tokens_each"] = len(prompts[0])
        self.stages[stage] = rec


SUBJECT_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
CHOICES = ["A", "B", "C", "D"]
MMLU_LABELS = [" A", " B", " C", " D"]


def read_split(mmlu: Path, subject: str, split: str) -> list[dict]:
    """One split of one MMLU subject (Hugging Face save-to-disk Arrow)."""
    import pyarrow as pa

    path = mmlu / subject / split / "data-00000-of-00001.arrow"
    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def mmlu_question(row: dict, answer: bool) -> str:
    """A question in the MMLU paper's format, with its answer letter or open after `Answer:`."""
    lines = [row["question"].strip()]
    lines += [f"{c}. {t}" for c, t in zip(CHOICES, row["choices"])]
    tail = f"Answer: {CHOICES[row['answer']]}\n\n" if answer else "Answer:"
    return "\n".join(lines) + "\n" + tail


def mmlu_prompts(mmlu: Path, per_subject: int, subjects: int, record: int = 1) -> list[dict]:
    """5-shot prompts (the dev split's five examples, then a question), subject by subject:
    the subject's first `record` validation questions (`warmup`: requests that find nothing
    stored and store the 5-shot head, as the paper's protocol records the validation
    questions first; after the first, `record_only`), then the first `per_subject` test
    questions, for each of the first `subjects`."""
    out = []
    names = sorted(p.name for p in mmlu.iterdir() if (p / "test").is_dir())[:subjects]
    for subject in names:
        shots = "".join(mmlu_question(r, True) for r in read_split(mmlu, subject, "dev"))
        head = SUBJECT_HEADER.format(subject.replace("_", " ")) + shots
        warm = read_split(mmlu, subject, "validation")[:max(record, 1)]
        rows = [(r, True) for r in warm] + [(r, False) for r in read_split(mmlu, subject, "test")[:per_subject]]
        for i, (row, warmup) in enumerate(rows):
            out.append({"subject": subject, "text": head + mmlu_question(row, False),
                        "answer": row["answer"], "warmup": warmup,
                        "record_only": warmup and i > 0})
    return out


class MmluServer(ClassifyServer):
    """`/v1/classify` on text with the four answer letters, the cache flag as asked."""

    def answer(self, text: str, cache: bool) -> tuple[list[float], dict, int]:
        body = json.dumps({"input": text, "labels": MMLU_LABELS, "attn_cache": cache}).encode()
        conn = self._conn()
        conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:500]!r}")
        out = json.loads(data)
        return out["data"][0]["probs"], out["attn_cache"]["inputs"][0], out["usage"]["prompt_tokens"]


def mmlu_stage(servers: dict, prompts: list[dict]) -> dict:
    """Each question through each system in turn (rotating start): `exact` (the fast server,
    flag off), `prefix` (the same server, flag on: the cache's prefix reuse) and
    `mistralrs-prefix` (a server with mistral.rs's own prefix cacher, flag off).

    Accuracy and the end-to-end speed-ups are over the test questions, each subject's
    validation question having gone first (timed apart); `*_cold` speed-ups count that
    first request too: a stream of 1 + N questions per subject with nothing stored."""
    systems = {"exact": (servers["fast"], False), "prefix": (servers["fast"], True),
               "mistralrs-prefix": (servers["mistralrs-prefix"], False)}
    names = list(systems)
    rec = {n: {"seconds": [], "warmup_seconds": [], "correct": 0, "predictions": [],
               "prefix_tokens": 0} for n in names}
    tokens = 0
    t_stage = time.perf_counter()
    for i, q in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            server, flag = systems[name]
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
            r["correct"] += int(pred == q["answer"])
            r["prefix_tokens"] += report.get("prefix_tokens", 0)
        if not q["warmup"]:
            tokens += n_tokens
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):
            log(f"mmlu {i + 1}/{len(prompts)} ({q['subject']}): "
                + ", ".join(f"{n} {sum(rec[n]['seconds']) + sum(rec[n]['warmup_seconds']):.1f} s"
                            for n in names)
                + f" [{time.perf_counter() - t_stage:.0f} s]")
    n = sum(1 for q in prompts if not q["warmup"])
    for name, r in rec.items():
        r["accuracy"] = r["correct"] / n
        r["total_s"] = sum(r["seconds"])
        r["total_with_warmup_s"] = r["total_s"] + sum(r["warmup_seconds"])
    same = all(a == b == c for a, b, c in zip(*(rec[n]["predictions"] for n in names)))
    t = {n: rec[n]["total_s"] for n in names}
    cold = {n: rec[n]["total_with_warmup_s"] for n in names}
    return {"questions": n, "subjects": len({q["subject"] for q in prompts}),
            "warmup_questions": sum(1 for q in prompts if q["warmup"]),
            "prompt_tokens": tokens, "systems": rec, "identical_predictions": same,
            "prefix_speedup": t["exact"] / t["prefix"],
            "prefix_vs_mistralrs": t["mistralrs-prefix"] / t["prefix"],
            "mistralrs_prefix_speedup": t["exact"] / t["mistralrs-prefix"],
            "prefix_speedup_cold": cold["exact"] / cold["prefix"],
            "mistralrs_prefix_speedup_cold": cold["exact"] / cold["mistralrs-prefix"]}


def ratios(stages: dict) -> dict:
    """other system's median time / fast's, per stage (> 1: fast is faster)."""
    out = {}
    for stage, rec in stages.items():
        systems = rec.get("systems")
        if not systems or "fast" not in systems or "prompts" not in rec:
            continue
        fast = systems["fast"]["median_s"]
        out[stage] = {n: s["median_s"] / fast for n, s in systems.items() if n != "fast"}
    return out


def top_level(stages: dict, r: dict) -> dict:
    """The figures the floors read, from whichever stages exist."""
    top = {}
    for key, stage, other in (("llm_fast_vs_stock_800", "single-800", "stock"),
                              ("llm_fast_vs_torch_800", "single-800", "torch"),
                              ("llm_fast_vs_llamacpp_800", "single-800", "llamacpp"),
                              ("llm_fast_vs_stock_800_batch16", "batch-16", "stock"),
                              ("llm_fast_vs_torch_800_batch16", "batch-16", "torch"),
                              ("llm_fast_vs_llamacpp_800_batch16", "batch-16", "llamacpp")):
        tokens = stages.get(stage, {}).get("tokens_each", [None])[0]
        if tokens == 800 and other in r.get(stage, {}):
            top[key] = r[stage][other]
    if "concurrent-8" in stages:
        top["llm_concurrent_gain"] = stages["concurrent-8"]["gain"]
    if "concurrent-8-short" in stages:
        top["llm_concurrent_gain_50"] = stages["concurrent-8-short"]["gain"]
    m = stages.get("mmlu")
    if m:
        top["llm_mmlu_acc_exact"] = m["systems"]["exact"]["accuracy"]
        top["llm_mmlu_acc_prefix"] = m["systems"]["prefix"]["accuracy"]
        top["llm_mmlu_identical_predictions"] = m["identical_predictions"]
        top["llm_prefix_speedup"] = m["prefix_speedup"]
        top["llm_prefix_vs_mistralrs"] = m["prefix_vs_mistralrs"]
        top["llm_mistralrs_prefix_speedup"] = m["mistralrs_prefix_speedup"]
        if m.get("prefix_speedup_cold"):
            top["llm_prefix_speedup_cold"] = m["prefix_speedup_cold"]
    return top


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Decoder exact prefill: {meta['model']}", "",
             f"commit {meta['commit']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores),"
             f" {meta['date']}; threads {meta['threads']}; the run took"
             f" {meta.get('wall_s', 0) / 60:.1f} min; medians of the calls listed.", "",
             "| stage | tokens | " + " | ".join(STAGE_ORDER) + " | torch/fast | llama.cpp/fast | stock/fast | commit |",
             "|---|---|" + "---|" * (len(STAGE_ORDER) + 4)]
    for stage, rec in result["stages"].items():
        if "systems" not in rec or "prompts" not in rec:
            continue
        cells = []
        for n in STAGE_ORDER:
            s = rec["systems"].get(n)
            cells.append(f"{s['median_s']:.3f} s (n={len(s['seconds'])})" if s else "—")
        r = result["ratios"].get(stage, {})
        fmt = lambda k: f"{r[k]:.2f}x" if k in r else "—"  # noqa: E731
        tokens = f"{rec['prompts']} × {rec['tokens_each'][0]}"
        lines.append(f"| {stage} | {tokens} | " + " | ".join(cells)
                     + f" | {fmt('torch')} | {fmt('llamacpp')} | {fmt('stock')} | {rec.get('commit', '')} |")
    lines += ["", "Largest |p − p_torch| over the prompts (labels \" yes\"/\" no\"): "
              + ", ".join(f"{stage} {n} {s['max_abs_p_diff_vs_torch']:.1e}"
                          for stage, rec in result["stages"].items() if "prompts" in rec
                          for n, s in rec["systems"].items() if "max_abs_p_diff_vs_torch" in s and n != "torch")]
    m = result["stages"].get("mmlu")
    if m:
        lines += ["", f"MMLU 5-shot ({m['questions']} test questions over {m['subjects']} subjects,"
                  f" {m['prompt_tokens']} prompt tokens; each subject's first validation question"
                  f" went first, timed apart; each question through every system in turn;"
                  f" commit {m.get('commit', '')}):", "",
                  "| system | accuracy | test questions | speed-up vs exact | with the validation question (cold) | speed-up |",
                  "|---|---|---|---|---|---|"]
        ex = m["systems"]["exact"]["total_s"]
        ex_cold = m["systems"]["exact"].get("total_with_warmup_s", ex)
        for n, s in m["systems"].items():
            cold = s.get("total_with_warmup_s", s["total_s"])
            lines.append(f"| {n} | {s['accuracy']:.3f} | {s['total_s']:.1f} s | {ex / s['total_s']:.2f}x"
                         f" | {cold:.1f} s | {ex_cold / cold:.2f}x |")
        lines += ["", f"Identical predictions across the three: {m['identical_predictions']};"
                  f" prefix reuse vs mistral.rs's prefix cacher: {m['prefix_vs_mistralrs']:.2f}x."]
    for stage in ("concurrent-8", "concurrent-8-short"):
        c = result["stages"].get(stage)
        if c:
            lines += ["", f"`/v1/classify` under 8 concurrent clients, prompts of {c.get('tokens_each', 200)}"
                      f" tokens (fast, commit {c.get('commit', '')}): {c['8-clients']['requests_per_s']:.2f}"
                      f" requests/s vs {c['one-at-a-time']['requests_per_s']:.2f} one at a time:"
                      f" **{c['gain']:.2f}x**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the GGUF file")
    p.add_argument("--server", required=True, help="the attncache-server binary")
    p.add_argument("--lengths", default="50,200,800",
                   help="prompt lengths (tokens) of the single-prompt stages")
    p.add_argument("--batch-tokens", type=int, default=800, help="tokens of each batch-16 prompt")
    p.add_argument("--reps", type=int, default=3, help="calls per system per stage")
    p.add_argument("--batch-reps", type=int, default=None,
                   help="calls per system on batch-16 (stock: --stock-batch-reps); default 1, --full 2")
    p.add_argument("--stock-batch-reps", type=int, default=None,
                   help="calls of stock on batch-16 (about 10 min each at 800 tokens); default 0,"
                        " --full 1")
    p.add_argument("--concurrent-secs", type=float, default=None,
                   help="seconds of each side of the 8-client stage (0: skip it); default 45,"
                        " --full 60")
    p.add_argument("--full", action="store_true",
                   help="the full run (about 34 min): stock on the batch, 2 batch calls, 8 MMLU"
                        " questions per subject, 60 s per side of the 8-client stage")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of every system (RAYON_NUM_THREADS for the servers)")
    p.add_argument("--systems", default=",".join(STAGE_ORDER),
                   help="which systems to run (comma-separated subset of fast,stock,torch,llamacpp)")
    p.add_argument("--stages", default="prefill,concurrent,mmlu",
                   help="which stages to run: prefill (single and batch-16), concurrent, mmlu")
    p.add_argument("--mmlu", type=Path, help="MMLU's directory (scripts/fetch-mmlu); needed by the mmlu stage")
    p.add_argument("--per-subject", type=int, default=None,
                   help="MMLU test questions per subject; default 5, --full 8")
    p.add_argument("--subjects", type=int, default=57, help="MMLU subjects (alphabetical order)")
    p.add_argument("--out", default="benches/results/llm", help="writes OUT.json and OUT.md")
    p.add_argument("--merge", action="store_true",
                   help="keep the stages of an existing OUT.json that this run does not run"
                        " (each stage records its own commit and date)")
    args = p.parse_args()
    for name, quick, full in (("batch_reps", 1, 2), ("stock_batch_reps", 0, 1),
                              ("concurrent_secs", 45.0, 60.0), ("per_subject", 5, 8)):
        if getattr(args, name) is None:
            setattr(args, name, full if args.full else quick)
    wanted = set(args.systems.split(","))
    atexit.register(peer_bench.stop_servers)
    t_start = time.perf_counter()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"llm-bench-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)

    log("loading torch + transformers (reads the GGUF, dequantizes to f32)")
    torch_sys = Torch(args.model, args.threads)
    systems: dict = {}
    if "torch" in wanted:
        systems["torch"] = torch_sys
    lengths = [int(x) for x in args.lengths.split(",")]
    n_ctx = max(lengths + [args.batch_tokens]) + 16
    if "llamacpp" in wanted:
        log("loading llama.cpp")
        systems["llamacpp"] = LlamaCpp(args.model, args.threads, n_ctx, torch_sys.label_ids)
    for name, flags in (("fast", []), ("stock", ["--exact-attention", "stock"])):
        if name in wanted:
            log(f"starting attncache-server ({name})")
            server = ClassifyServer(name, args.server, str(args.model), flags, args.threads,
                                    logdir, 300)
            peer_bench._SERVERS.append(server)
            systems[name] = server
    stages = set(args.stages.split(","))
    if "mmlu" in stages:
        if args.mmlu is None:
            raise SystemExit("the mmlu stage needs --mmlu DIR (scripts/fetch-mmlu)")
        if "fast" not in systems:
            raise SystemExit("the mmlu stage needs the fast system")
        log("starting attncache-server (mistralrs-prefix: mistral.rs's own prefix cacher)")
        server = MmluServer("mistralrs-prefix", args.server, str(args.model),
                            ["--engine-prefix-cache", "1024"], args.threads, logdir, 300)
        peer_bench._SERVERS.append(server)
        systems["fast"].__class__ = MmluServer
        mmlu_servers = {"fast": systems["fast"], "mistralrs-prefix": server}
    bench = Bench(args, {k: v for k, v in systems.items() if k != "mistralrs-prefix"})
    try:
        if "prefill" in stages:
            for n in lengths:
                texts, ids = prompts(torch_sys.tokenizer, n, 1)
                bench.call("fast", texts, ids) if "fast" in systems else None  # warm-up
                bench.stage(f"single-{n}", texts, ids, {k: args.reps for k in systems})
            texts, ids = prompts(torch_sys.tokenizer, args.batch_tokens, 16)
            reps = {k: args.batch_reps if k != "stock" else args.stock_batch_reps for k in systems}
            bench.stage("batch-16", texts, ids, reps)
        if "concurrent" in stages and args.concurrent_secs > 0 and "fast" in systems:
            # 200-token prompts (the floor's stage), then short ones, where a forward's
            # fixed cost (streaming the weights) is a larger share and batching pays more
            for n_tok, stage in ((200, "concurrent-8"), (50, "concurrent-8-short")):
                _, ids = prompts(torch_sys.tokenizer, n_tok, 32)
                bench.concurrent(ids, args.concurrent_secs, 8, stage)
        if "mmlu" in stages:
            questions = mmlu_prompts(args.mmlu, args.per_subject, args.subjects)
            log(f"mmlu: {len(questions)} questions, 5-shot")
            bench.stages["mmlu"] = mmlu_stage(mmlu_servers, questions)
    finally:
        peer_bench.stop_servers()

    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = Path(args.out)
    commit = peer_bench.git_commit()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for rec in bench.stages.values():
        rec["commit"], rec["date"] = commit, now
    stages = bench.stages
    if args.merge and out.with_suffix(".json").exists():
        # the stages run now replace theirs; the others keep their own commit and date
        old = json.loads(out.with_suffix(".json").read_text())
        for rec in old.get("stages", {}).values():  # files written before stages kept theirs
            rec.setdefault("commit", old.get("meta", {}).get("commit"))
            rec.setdefault("date", old.get("meta", {}).get("date"))
        stages = {**old.get("stages", {}), **stages}
    r = ratios(stages)
    result = {
        **top_level(stages, r),
        "meta": {"model": args.model.name, "commit": commit, "date": now,
                 "machine": peer_bench.machine(), "threads": args.threads,
                 "server": peer_bench.server_version(args.server),
                 "torch": pkg("torch"), "transformers": pkg("transformers"),
                 "llama_cpp_python": pkg("llama_cpp_python"), "systems": sorted(systems),
                 "wall_s": round(time.perf_counter() - t_start, 1)},
        "ratios": r,
        "stages": stages,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.with_suffix(".json").exists():
        # make llm-eval's keys (llm_spam_*, llm_rerank_*, copied here) are its own: kept as they are
        old = json.loads(out.with_suffix(".json").read_text())
        result.update({k: v for k, v in old.items() if k.startswith(("llm_spam", "llm_rerank"))})
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out}.json and {out}.md in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

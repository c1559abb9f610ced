"""`make peer-bench`: sentence-transformers (PyTorch) against attncache-server, interleaved.

The reference implementation of EmbeddingGemma-300M is sentence-transformers over
transformers' Gemma-3 in PyTorch. This script measures it and our server on the same inputs,
on the same machine, in one run, with every system measured in turn (round-robin, the
starting system rotating each round) so slow drifts of the machine hit all of them alike.

Systems:

- ``torch``: ``SentenceTransformer(MODEL, device="cpu")`` in float32, in this process, with
  ``torch.set_num_threads(--threads)`` and ``max_seq_length = 2048``;
- ``stock``: attncache-server ``--exact-attention stock`` (mistral.rs's own attention kernel);
- ``fast``: attncache-server ``--exact-attention fast`` (our exact path, the default);
- ``map-hit``: attncache-server with the attention-map cache on and no exact-repeat memory
  (``--attn-cache on --repeat-mib 0 --cache-max-tokens 2048 --hot-sizing fixed --hot-mib
  4096``): each input is sent once untimed (a miss that records its maps), so every measured
  call reuses the stored maps (outcome ``hit``, checked);
- ``exact-repeat``: attncache-server ``--attn-cache on``: after one untimed call the measured
  calls are answered from the remembered embedding (outcome ``exact_repeat``, checked).

Every server listens on 127.0.0.1 on a free port and is started and killed by this script
(also on Ctrl-C or an error). Only one system is sent work at a time, except in the
concurrency stage, where 8 client threads share one system.

Stages:

- ``single-128``, ``single-512``, ``single-2048``: one input of exactly that many tokens
  (special tokens included; the server's ``usage.prompt_tokens`` must agree) per call;
  all five systems; the cosine of every served embedding to torch's is recorded;
- ``batch-32``: 32 texts of 16…512 tokens in one call (torch: ``encode(texts,
  batch_size=32)``); torch, stock, fast;
- ``concurrent-8``: 8 threads, each sending one (seeded) random text of the batch per
  request for ``--concurrent-secs``; torch is a ThreadPoolExecutor of 8 threads calling
  ``model.encode([t])`` in this process (what a naive in-process torch server does), ours is
  ``fast``; requests/s, tokens/s and latency percentiles.

Texts are deterministic: windows of the English prose below (written for this benchmark),
with EmbeddingGemma's document prompt ``title: none | text: `` in front, cut to the exact
token count with the model's own tokenizer.

Writes ``OUT.json`` (ratios torch time / our time at the top, > 1 means we are faster; the
machine, versions and commit under ``meta``; every raw timing under ``stages``) and
``OUT.md`` (the tables, also printed on stdout). Progress goes to stderr, one line per call.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import datetime
import http.client
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:  # imported here for the helpers; `--help` works without the venv
    import numpy as np
except ImportError:
    np = None

PROMPT = "title: none | text: "
SEED = 20251201
MAP_HIT_FLAGS = ["--attn-cache", "on", "--repeat-mib", "0", "--cache-max-tokens", "2048",
                 "--hot-sizing", "fixed", "--hot-mib", "4096"]
SERVERS = {
    "stock": ["--exact-attention", "stock"],
    "fast": ["--exact-attention", "fast"],
    "map-hit": MAP_HIT_FLAGS,
    "exact-repeat": ["--attn-cache", "on"],
}
# The cache outcome every measured call of a server must report.
EXPECTED_OUTCOME = {"stock": "off", "fast": "off", "map-hit": "hit",
                    "exact-repeat": "exact_repeat"}
SINGLE_SYSTEMS = ["torch", "stock", "fast", "map-hit", "exact-repeat"]
BATCH_SYSTEMS = ["torch", "stock", "fast"]
CONCURRENT_SYSTEMS = ["torch", "fast"]
HTTP_TIMEOUT_S = 1800

# Realistic English prose, written for this benchmark (no data set to fetch). Texts are
# windows of these paragraphs, joined in order from a starting paragraph (cyclically).
PROSE = [
    "The night train from Vienna reached the border a little after two in the morning, and"
    " the conductor walked the length of the carriage waking everyone for the passport"
    " check. Most passengers had been asleep for hours, curled against the windows with"
    " coats for pillows, and they blinked at the officers as if they had forgotten where"
    " they were going. An elderly couple near the door had packed a whole supper in a"
    " wicker basket and offered bread and cheese to anyone who looked hungry. By the time"
    " the train moved again the sky over the fields had begun to turn grey, and a farmer on"
    " a tractor raised his hand to us as we passed, as though he did this every morning and"
    " expected the same wave in return.",
    "Sourdough is less a recipe than a relationship. The starter lives on a shelf in the"
    " kitchen, a jar of flour and water that has captured wild yeast and bacteria from the"
    " air, and it needs feeding every day or it turns sour and sluggish. Bakers talk about"
    " their starters the way other people talk about pets, with names and moods and"
    " histories. The bread itself takes the better part of two days: mixing, resting,"
    " folding the dough every half hour, shaping it gently so the bubbles survive, and then"
    " a long cold rise overnight. When the loaf finally comes out of the oven the crust"
    " crackles as it cools, and the whole house smells of toasted grain and something"
    " faintly like apples.",
    "The city council voted on Tuesday to extend the tram line to the northern suburbs,"
    " ending a debate that had lasted almost a decade. Supporters argued that the new"
    " stops would cut commuting times in half for thousands of residents who currently"
    " depend on crowded buses, while opponents worried about the cost and about two years"
    " of construction on the main shopping street. The final plan includes a separate lane"
    " for bicycles, new trees along the route and a promise that local shops will receive"
    " compensation if their sales fall during the works. Engineers expect the first trams"
    " to run on the extension in the spring of the year after next, provided the steel"
    " for the rails arrives on schedule.",
    "Honeybees communicate the location of food through a dance performed on the vertical"
    " surface of the comb. A forager returning from a rich patch of flowers runs in a"
    " straight line while waggling her abdomen, then circles back and repeats the run. The"
    " angle of the straight run relative to the vertical tells the other bees the direction"
    " of the flowers relative to the sun, and the duration of the waggle tells them the"
    " distance. Researchers who decoded the dance in the last century were at first met"
    " with disbelief, because it seemed impossible that an insect could encode geometry so"
    " precisely. Later experiments with robotic bees and radar tracking confirmed that"
    " recruits really do fly to the place the dance describes.",
    "I bought this vacuum cleaner after my old one finally gave up, and after three months"
    " of daily use I have mixed feelings about it. The suction is excellent on hard floors"
    " and it picks up dog hair from the rug better than anything I have owned before. The"
    " battery lasts about forty minutes, which is enough for our flat, and it charges"
    " overnight on the wall mount. On the other hand, the dust container is small and has"
    " to be emptied after every room, and the brush tangles with long hair so often that I"
    " keep a pair of scissors next to the charger. Customer service replaced a broken clip"
    " quickly and without argument, which counts for a lot.",
    "When the database began to slow down every afternoon, the team first suspected the"
    " new reporting feature, since it had shipped the same week. The query logs told a"
    " different story. A nightly cleanup job had been failing silently for months, and the"
    " table of expired sessions had grown to several hundred million rows. Every login"
    " scanned part of that table, and as traffic peaked after lunch the scans piled up and"
    " held locks that blocked other writes. The fix itself was small: repair the job, add"
    " an index, and delete the old rows in batches over a weekend. The more lasting change"
    " was an alert that fires when any scheduled job has not reported success for a day.",
    "The lighthouse on the headland was built in the eighteen sixties, after a storm drove"
    " three ships onto the rocks in a single winter. Its first keeper lived in the cottage"
    " at its foot with his wife and seven children, and the logbooks they kept record every"
    " fog, every passing steamer and every night the lamp had to be relit by hand. The"
    " light was automated long ago, and the cottage is now a small museum run by"
    " volunteers. Visitors can climb the spiral staircase to the lantern room, where the"
    " great glass lens still turns slowly, and look out over the same water that the keeper"
    " watched through a hundred and fifty years of storms.",
    "Learning a second language as an adult is humbling in a way that few other skills"
    " are. You can read a newspaper article slowly with a dictionary and feel quite"
    " pleased with yourself, and then a waiter asks you a simple question at normal speed"
    " and your mind goes completely blank. Teachers say the breakthrough usually comes not"
    " from grammar drills but from hours of listening to real conversations, podcasts and"
    " films, until the sounds stop being noise and start falling into words. It also helps"
    " to accept sounding foolish. The people who improve fastest are often the ones who"
    " keep talking through their mistakes instead of waiting until every sentence is"
    " perfect.",
    "The hotel was close to the station and the old town, which made it easy to explore on"
    " foot, and the staff at the front desk were friendly and full of good advice about"
    " where to eat. Our room was clean but very small, with barely enough space to open"
    " both suitcases at once, and the walls were thin enough that we heard our neighbours'"
    " television until midnight. Breakfast was the highlight: fresh pastries, local cheese,"
    " fruit and strong coffee, served in a bright room overlooking the courtyard. For the"
    " price it was a reasonable choice, but next time I would pay a little more for a"
    " quieter room on the upper floors.",
    "Glaciers move, although far too slowly to see with the naked eye. The ice at the"
    " surface is brittle and cracks into deep crevasses as the glacier flows over bumps in"
    " the rock below, while the ice deeper down is under so much pressure that it deforms"
    " like very thick syrup. Meltwater running along the base can lubricate the bed and"
    " make the whole glacier slide faster in summer. By drilling holes and placing markers,"
    " scientists have measured speeds ranging from a few metres to several kilometres a"
    " year. These measurements matter beyond curiosity, because the speed at which glaciers"
    " carry ice into the sea is one of the largest uncertainties in forecasts of future sea"
    " level.",
    "My grandmother kept a garden that fed the family for most of the year. In spring she"
    " planted peas and lettuce as soon as the ground could be worked, then beans, tomatoes"
    " and courgettes once the frosts had passed. She never used a planting chart; she"
    " simply knew which corner stayed damp, which bed got the afternoon sun, and which"
    " plants disliked each other. In late summer the kitchen filled with steam as she"
    " bottled tomatoes and made jam from the plums along the fence. I have tried to grow a"
    " few of the same vegetables on my balcony, with modest success, and every harvest"
    " makes me wish I had asked her more questions while I had the chance.",
    "The central bank left interest rates unchanged this month but signalled that it may"
    " cut them before the end of the year if inflation continues to ease. Prices rose more"
    " slowly than expected over the summer, mainly because energy costs fell, although the"
    " cost of services such as rent and insurance is still climbing. Some economists warn"
    " that cutting too early could allow inflation to return, while business groups argue"
    " that high borrowing costs are already delaying investment and hiring. Markets reacted"
    " calmly to the announcement, and the currency was little changed against the dollar by"
    " the close of trading.",
    "Writing good error messages is one of the most underrated skills in software. A"
    " message that says only that something failed forces the reader to guess, to search"
    " the logs, or to ask a colleague, while a message that names the file, the value that"
    " was wrong and what was expected usually lets them fix the problem in a minute. The"
    " best messages are written from the point of view of the person who will read them at"
    " three in the morning, tired and under pressure. They avoid jargon that only the"
    " original author understands, they say what the program was trying to do, and where"
    " possible they suggest the next step.",
    "The museum's new exhibition brings together more than two hundred maps drawn over five"
    " centuries, from hand-painted charts on sheepskin to satellite images of the same"
    " coastline. What stands out is how much each map reveals about the people who made"
    " it. Early sailors exaggerated the harbours they knew and filled unknown interiors with"
    " mountains and monsters; colonial surveyors drew straight borders across land they had"
    " never walked; modern cartographers argue about projections that make some continents"
    " look larger than they are. The final room invites visitors to draw a map of their own"
    " neighbourhood from memory, and the results pinned to the wall are funny and oddly"
    " moving.",
    "Running a marathon for the first time taught me more about patience than about speed."
    " The training plan stretched over sixteen weeks, with one long run every weekend that"
    " grew a little longer each time, and most of the work happened at an easy pace that"
    " felt almost too slow. On race day the first ten kilometres flew by in a crowd of"
    " cheering spectators, and I had to keep reminding myself not to chase the people"
    " passing me. The last six kilometres were hard in a way I had not imagined, but I"
    " finished, and the medal still hangs on the hook by the front door where I see it"
    " every morning.",
    "Volcanic soils are among the most fertile on earth, which is why farmers have always"
    " returned to the slopes of active volcanoes despite the danger. Ash from eruptions"
    " weathers quickly into clay rich in minerals such as potassium and phosphorus, and the"
    " loose structure of the soil holds water well while letting roots breathe. Vineyards on"
    " the lower slopes produce wines with a distinctive mineral taste, and orchards and"
    " vegetable plots climb as high as the climate allows. Modern monitoring of gas"
    " emissions and small earthquakes now gives communities some warning before an"
    " eruption, but living in the shadow of the mountain still means accepting a certain"
    " amount of risk.",
    "The apartment we rented for the summer had a tiny balcony facing the harbour, and we"
    " spent most evenings there watching the fishing boats come in. Each boat was met by a"
    " small crowd of buyers from the restaurants along the quay, who argued over the catch"
    " in loud voices and then carried crates of fish away on their shoulders. Later the"
    " restaurants set tables out on the stones, strings of lights came on between the"
    " lamp-posts, and the whole waterfront filled with families eating late dinners. By"
    " midnight the harbour was quiet again except for the sound of ropes creaking as the"
    " boats rocked gently at their moorings.",
    "Good documentation starts with a clear statement of what a tool is for and who should"
    " use it. Too many projects open with installation instructions and a list of features,"
    " leaving the reader to work out whether the tool solves their problem at all. A short"
    " example that does something useful, copied and pasted into a terminal, is worth more"
    " than pages of reference material. The reference still matters, of course, but it"
    " should be complete and accurate rather than clever, with every option described in"
    " plain words, the default values stated, and the limits spelled out so that nobody"
    " has to discover them in production.",
]


# ----------------------------------------------------------------------------- progress

def log(msg: str) -> None:
    """A plain progress line on stderr."""
    print(f"peer-bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- servers

class Server:
    """One attncache-server process on 127.0.0.1, a free port, killed by `stop`."""

    def __init__(self, name: str, binary: str, model: str, flags: list[str], threads: int,
                 logdir: Path, startup_timeout_s: float):
        self.name = name
        self.argv = [binary, "--model", model, "--host", "127.0.0.1", "--port", "0", *flags]
        self.log_path = logdir / f"server-{name}.log"
        self.port: int | None = None
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + startup_timeout_s
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: attncache-server exited with {self.proc.returncode}"
                                   f" before listening; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no `listening on` line after {startup_timeout_s} s;"
                                   f" see {self.log_path}")
        self._local = threading.local()

    def _read_stdout(self) -> None:
        """Finds `listening on [http://]HOST:PORT`, then keeps draining (and logging) stdout."""
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self._log.write(b"[stdout] " + raw)
            self._log.flush()
            m = re.search(r"listening on (?:https?://)?[^\s:]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()

    def _conn(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection to the server."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S)
            self._local.conn = conn
        return conn

    def info(self) -> dict:
        """GET /info, parsed (raises on non-200)."""
        conn = self._conn()
        conn.request("GET", "/info")
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: /info: HTTP {resp.status}: {data[:500]!r}")
        return json.loads(data)

    def embed(self, texts: list[str]) -> dict:
        """POST /v1/embeddings with these inputs; the parsed response (raises on non-200)."""
        body = json.dumps({"model": "default", "input": texts}).encode()
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request("POST", "/v1/embeddings", body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                # A keep-alive connection the server closed: reconnect once.
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:500]!r}")
        return json.loads(data)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_SERVERS: list[Server] = []


def _die_with_parent() -> None:
    """In the child: SIGKILL it if this script dies without cleaning up (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_servers() -> None:
    """Stops every server this script started (at exit, on Ctrl-C and on errors)."""
    while _SERVERS:
        s = _SERVERS.pop()
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            log(f"stopping {s.name}: {e}")


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


class ForeignCpu:
    """CPU seconds spent by processes other than this script and its servers (from /proc):
    how much else ran during a stage, i.e. how noisy its timings may be."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")

    def _busy(self) -> float:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        return (sum(f[:8]) - f[3] - f[4]) / self.tick

    def _ours(self) -> float:
        t = os.times()
        total = t.user + t.system
        for srv in _SERVERS:
            try:
                fields = Path(f"/proc/{srv.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def mark(self) -> tuple[float, float] | None:
        try:
            return self._busy(), self._ours()
        except (OSError, ValueError):
            return None

    def since(self, mark) -> float | None:
        now = self.mark()
        if mark is None or now is None:
            return None
        return round(max(0.0, (now[0] - mark[0]) - (now[1] - mark[1])), 2)


FOREIGN = ForeignCpu()


# ----------------------------------------------------------------------------- texts

class Texts:
    """Deterministic inputs of exact token counts, counted by the model's tokenizer."""

    def __init__(self, model):
        self.model = model
        self.tok = model.tokenizer
        self.prose = PROSE

    def count(self, text: str) -> int:
        """Tokens of `text` as sentence-transformers feeds it to the model (specials included)."""
        # `preprocess` is what the deprecated `model.tokenize` calls in sentence-transformers 6
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        return len(tokenize([text])["input_ids"][0])

    def body(self, start: int, skip_words: int, min_tokens: int) -> list[int]:
        """Token ids (no specials) of the prose from paragraph `start` on, minus `skip_words`
        leading words, cycling through the paragraphs until there are `min_tokens`."""
        paras, i = [], start
        while True:
            paras.append(self.prose[i % len(self.prose)])
            text = " ".join(" ".join(paras).split()[skip_words:])
            ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= min_tokens:
                return ids
            i += 1

    def make(self, tokens: int, start: int = 0, skip_words: int = 0) -> str:
        """`PROMPT` + prose, exactly `tokens` tokens long (special tokens included)."""
        overhead = self.count(PROMPT)  # the prompt and the special tokens
        ids = self.body(start, skip_words, tokens + 16)
        k = max(1, tokens - overhead)
        seen = set()
        for _ in range(40):
            text = PROMPT + self.tok.decode(ids[:k], skip_special_tokens=True).strip()
            n = self.count(text)
            if n == tokens:
                return text
            seen.add(k)
            step = tokens - n
            k2 = k + step
            if k2 in seen:  # oscillating around a merge: try the untried neighbours
                k2 = next((c for c in (k + 1, k - 1, k + 2, k - 2) if c not in seen and c > 0),
                          None)
                if k2 is None:
                    break
            k = max(1, k2)
        raise RuntimeError(f"could not cut a text of exactly {tokens} tokens")

    def batch(self, n: int = 32, lo: int = 16, hi: int = 512) -> list[str]:
        """`n` texts with lengths spread evenly over lo…hi tokens, in a seeded mixed order,
        each from a different place in the prose."""
        lengths = [round(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
        random.Random(SEED).shuffle(lengths)
        return [self.make(t, start=i, skip_words=7 * (i // len(self.prose)))
                for i, t in enumerate(lengths)]


# ----------------------------------------------------------------------------- statistics

def summary(ms: list[float]) -> dict:
    """Median, p10, p90 (linear interpolation), mean, min, max of a list of milliseconds."""
    a = np.asarray(ms, dtype=float)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- the bench

class Bench:
    """Holds the model, the servers and the results; each stage is a method."""

    def __init__(self, args, model, servers: dict[str, Server], texts: Texts):
        self.args = args
        self.model = model
        self.servers = servers
        self.texts = texts
        self.stages: dict[str, dict] = {}
        self.odd: list[str] = []  # anything unexpected, for the report
        self.step = 0
        self.total = 0

    def note_foreign(self, stage: str, rec: dict, mark, secs: float) -> None:
        """Records the CPU seconds other processes used during the stage (odd above 2%)."""
        cpu = FOREIGN.since(mark)
        rec["stage_wall_s"] = round(secs, 1)
        rec["foreign_cpu_s"] = cpu
        if cpu is not None and cpu > 0.02 * secs * (os.cpu_count() or 1):
            self.odd.append(f"{stage}: other processes used {cpu:.1f} CPU-s during its"
                            f" {secs:.0f} s: its timings are noisy")

    def torch_encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, show_progress_bar=False,
                                 convert_to_numpy=True)

    def call(self, system: str, texts: list[str]):
        """One timed call: (ms, embeddings, prompt_tokens or None, outcomes or None)."""
        if system == "torch":
            t = time.perf_counter()
            emb = self.torch_encode(texts, batch_size=len(texts))
            ms = (time.perf_counter() - t) * 1e3
            return ms, [np.asarray(e) for e in emb], None, None
        t = time.perf_counter()
        r = self.servers[system].embed(texts)
        ms = (time.perf_counter() - t) * 1e3
        emb = [d["embedding"] for d in sorted(r["data"], key=lambda d: d["index"])]
        outcomes = [i["outcome"] for i in r.get("attn_cache", {}).get("inputs", [])]
        return ms, emb, r["usage"]["prompt_tokens"], outcomes

    def run_interleaved(self, stage: str, systems: list[str], texts: list[str],
                        rounds: int, tokens: list[int]) -> dict:
        """Warms every system once on `texts` (untimed; records maps / embeddings for the
        cache systems), then `rounds` rounds, each system once per round, the starting
        system rotating. Returns the stage's record."""
        expected_tokens = sum(tokens)
        rec = {"tokens": tokens, "rounds": rounds, "systems": {},
               "loadavg_before": os.getloadavg()}
        foreign = FOREIGN.mark()
        t_stage = time.perf_counter()
        per = {s: {"ms": [], "outcomes": [], "cos_to_torch": []} for s in systems}
        torch_emb = None
        for s in systems:  # warm-up
            ms, emb, ptok, outcomes = self.call(s, texts)
            if s == "torch":
                torch_emb = emb
            per[s]["warmup_ms"] = ms
            per[s]["warmup_outcomes"] = outcomes
            if ptok is not None and ptok != expected_tokens:
                raise AssertionError(f"{stage} {s}: server counts {ptok} prompt tokens, "
                                     f"sentence-transformers {expected_tokens}")
            tag = f" ({','.join(sorted(set(outcomes)))})" if outcomes else ""
            log(f"warm-up {stage} {s} {ms:.0f} ms{tag}")
        for r in range(rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for s in order:
                ms, emb, ptok, outcomes = self.call(s, texts)
                self.step += 1
                per[s]["ms"].append(ms)
                if s == "torch":
                    torch_emb = emb
                else:
                    per[s]["outcomes"].append(outcomes)
                    want = EXPECTED_OUTCOME[s]
                    bad = [o for o in outcomes if o != want]
                    if bad:
                        self.odd.append(f"{stage} {s} round {r}: outcomes {sorted(set(bad))},"
                                        f" expected {want}")
                    if ptok != expected_tokens:
                        raise AssertionError(f"{stage} {s}: server counts {ptok} prompt"
                                             f" tokens, sentence-transformers {expected_tokens}")
                    per[s]["cos_to_torch"].append(min(cosine(a, b)
                                                      for a, b in zip(emb, torch_emb)))
                log(f"{self.step}/{self.total} {stage} {s} {ms:.0f} ms")
        for s in systems:
            d = per[s]
            d.update(summary(d["ms"]))
            if d["cos_to_torch"]:
                d["min_cos_to_torch"] = min(d["cos_to_torch"])
                if d["min_cos_to_torch"] < 0.99999:
                    self.odd.append(f"{stage} {s}: cosine to torch {d['min_cos_to_torch']:.7f}"
                                    " < 0.99999")
            rec["systems"][s] = d
        rec["loadavg_after"] = os.getloadavg()
        self.note_foreign(stage, rec, foreign, time.perf_counter() - t_stage)
        torch_med = rec["systems"]["torch"]["median"]
        rec["torch_over"] = {s: torch_med / rec["systems"][s]["median"]
                             for s in systems if s != "torch"}
        return rec

    def single(self, tokens: int, rounds: int) -> None:
        stage = f"single-{tokens}"
        text = self.texts.make(tokens, start={128: 2, 512: 5, 2048: 8}.get(tokens, 0))
        assert self.texts.count(text) == tokens
        rec = self.run_interleaved(stage, SINGLE_SYSTEMS, [text], rounds, [tokens])
        rec["text"] = text
        self.stages[stage] = rec

    def batch(self, texts: list[str], tokens: list[int], rounds: int) -> None:
        rec = self.run_interleaved("batch-32", BATCH_SYSTEMS, texts, rounds, tokens)
        self.stages["batch-32"] = rec

    def concurrent(self, texts: list[str], tokens: list[int], secs: float,
                   clients: int = 8) -> None:
        """`clients` threads for `secs` seconds each sending one seeded random text of the
        batch per request, per system in turn."""
        stage = f"concurrent-{clients}"
        rec = {"clients": clients, "secs": secs, "systems": {},
               "loadavg_before": os.getloadavg(),
               "torch_note": f"torch: a ThreadPoolExecutor of {clients} threads calling"
                             " model.encode([t]) in one process (a naive in-process torch"
                             " server), torch.set_num_threads unchanged"}
        foreign = FOREIGN.mark()
        t_stage = time.perf_counter()
        for s in CONCURRENT_SYSTEMS:
            lat: list[float] = []
            toks: list[int] = []
            errors: list[str] = []
            lock = threading.Lock()
            start = time.perf_counter()
            deadline = start + secs

            def client(i: int) -> float:
                rng = random.Random(SEED + i)
                last = start
                while time.perf_counter() < deadline:
                    j = rng.randrange(len(texts))
                    t = time.perf_counter()
                    try:
                        if s == "torch":
                            self.torch_encode([texts[j]], batch_size=1)
                        else:
                            r = self.servers[s].embed([texts[j]])
                            if r["usage"]["prompt_tokens"] != tokens[j]:
                                raise AssertionError(f"prompt_tokens {r['usage']['prompt_tokens']}"
                                                     f" != {tokens[j]}")
                    except Exception as e:  # recorded, reported as odd
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                        continue
                    last = time.perf_counter()
                    with lock:
                        lat.append((last - t) * 1e3)
                        toks.append(tokens[j])
                return last

            log(f"{stage} {s}: {clients} clients for {secs:g} s")
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                ends = list(pool.map(client, range(clients)))
            wall = max(ends) - start
            self.step += 1
            d = {"requests": len(lat), "tokens": sum(toks), "wall_s": wall,
                 "requests_per_s": len(lat) / wall, "tokens_per_s": sum(toks) / wall,
                 "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat else None,
                                "p90": float(np.percentile(lat, 90)) if lat else None,
                                "p99": float(np.percentile(lat, 99)) if lat else None},
                 "errors": len(errors), "first_errors": errors[:5], "raw_ms": lat}
            if errors:
                self.odd.append(f"{stage} {s}: {len(errors)} failed requests, e.g."
                                f" {errors[0]}")
            rec["systems"][s] = d
            log(f"{self.step}/{self.total} {stage} {s} {d['requests_per_s']:.2f} req/s"
                f" {d['tokens_per_s']:.0f} tok/s p50 {d['latency_ms']['p50'] or 0:.0f} ms")
        rec["loadavg_after"] = os.getloadavg()
        self.note_foreign(stage, rec, foreign, time.perf_counter() - t_stage)
        self.stages[stage] = rec


# ----------------------------------------------------------------------------- metadata

def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "ram_gib": ram,
            "kernel": platform.release(), "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def server_version(binary: str) -> str | None:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    meta = result["meta"]
    m = meta["machine"]
    out = ["# peer-bench: sentence-transformers (PyTorch) vs attncache-server", "",
           f"{meta['utc']}, commit `{meta['git_commit']}`, {m['cpu']}, {m['cores']} cores,"
           f" {m['ram_gib']} GiB RAM; torch {meta['versions']['torch']}, sentence-transformers"
           f" {meta['versions']['sentence_transformers']}, transformers"
           f" {meta['versions']['transformers']}; {meta['threads']} threads for torch"
           f" (`torch.set_num_threads`) and each server (`RAYON_NUM_THREADS`); float32.", "",
           "Median wall ms per call (p10–p90), every system measured in turn (round-robin,"
           " rotating start). `torch/x` = torch's median / x's median: above 1, x is faster"
           " than sentence-transformers. `cos` = smallest cosine of x's embedding to torch's.",
           ""]
    for name, st in result["stages"].items():
        if name.startswith("concurrent"):
            continue
        toks = st["tokens"]
        desc = f"{toks[0]} tokens" if len(toks) == 1 else \
            f"{len(toks)} inputs, {min(toks)}…{max(toks)} tokens, {sum(toks)} in all"
        out += [f"## {name} ({desc}, {st['rounds']} rounds)", "",
                f"Stage wall {st.get('stage_wall_s')} s; other processes used"
                f" {st.get('foreign_cpu_s')} CPU-s meanwhile.", "",
                "| system | median ms | p10 | p90 | torch/x | cos to torch | outcome |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for s, d in st["systems"].items():
            ratio = "" if s == "torch" else f"{st['torch_over'][s]:.2f}"
            cos = f"{d['min_cos_to_torch']:.9f}" if "min_cos_to_torch" in d else ""
            outs = sorted({o for call in d.get("outcomes", []) for o in call})
            out.append(f"| {s} | {d['median']:.1f} | {d['p10']:.1f} | {d['p90']:.1f} |"
                       f" {ratio} | {cos} | {','.join(outs)} |")
        out.append("")
    for name, st in result["stages"].items():
        if not name.startswith("concurrent"):
            continue
        out += [f"## {name} ({st['clients']} client threads, {st['secs']:g} s each,"
                " random texts of the batch)", "",
                f"Stage wall {st.get('stage_wall_s')} s; other processes used"
                f" {st.get('foreign_cpu_s')} CPU-s meanwhile.", "",
                "| system | requests | req/s | tokens/s | p50 ms | p90 ms | p99 ms | errors |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s, d in st["systems"].items():
            lat = d["latency_ms"]
            f = lambda v: f"{v:.0f}" if v is not None else "–"  # noqa: E731
            out.append(f"| {s} | {d['requests']} | {d['requests_per_s']:.2f} |"
                       f" {d['tokens_per_s']:.0f} | {f(lat['p50'])} | {f(lat['p90'])} |"
                       f" {f(lat['p99'])} | {d['errors']} |")
        out += ["", st["torch_note"] + "; ours: `fast` (the server batches concurrent"
                " requests itself).", ""]
    out += ["## Summary (torch time / our time; > 1: we are faster)", "",
            "| key | value |", "| --- | ---: |"]
    for k, v in result.items():
        if k not in ("meta", "stages"):
            out.append(f"| `{k}` | {'–' if v is None else f'{v:.2f}'} |")
    if meta["odd"]:
        out += ["", "## Odd", ""] + [f"- {o}" for o in meta["odd"]]
    return "\n".join(out) + "\n"


def top_level(stages: dict) -> dict:
    def ratio(stage, system):
        st = stages.get(stage)
        return st["torch_over"].get(system) if st else None

    conc = stages.get("concurrent-8", {}).get("systems", {})
    tps = None
    if "fast" in conc and "torch" in conc and conc["torch"]["tokens_per_s"] > 0:
        tps = conc["fast"]["tokens_per_s"] / conc["torch"]["tokens_per_s"]
    return {
        "fast_vs_torch_128": ratio("single-128", "fast"),
        "fast_vs_torch_512": ratio("single-512", "fast"),
        "fast_vs_torch_2048": ratio("single-2048", "fast"),
        "stock_vs_torch_128": ratio("single-128", "stock"),
        "stock_vs_torch_512": ratio("single-512", "stock"),
        "batch_vs_torch": ratio("batch-32", "fast"),
        "hit_vs_torch_512": ratio("single-512", "map-hit"),
        "concurrent_tokens_per_s_vs_torch": tps,
    }


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="peer_bench.py",
        description="Benchmark sentence-transformers (PyTorch, EmbeddingGemma's reference"
                    " implementation) against attncache-server on the same inputs,"
                    " interleaved in one run; writes OUT.json and OUT.md. Progress lines go"
                    " to stderr, the tables to stdout.",
        epilog="Systems: torch (sentence-transformers in this process), stock (--exact-attention"
               " stock), fast (--exact-attention fast), map-hit (--attn-cache on --repeat-mib 0"
               " --cache-max-tokens 2048 --hot-sizing fixed --hot-mib 4096, measured calls reuse"
               " stored maps), exact-repeat (--attn-cache on, measured calls return the"
               " remembered embedding). Stages: single-128/512/2048, batch-32, concurrent-8.")
    p.add_argument("--model", metavar="DIR", default=os.path.expanduser(
        "~/.cache/attncache/models/embeddinggemma-300m"),
        help="EmbeddingGemma-300M directory (sentence-transformers layout), loaded by"
             " sentence-transformers and by every server (default: %(default)s)")
    p.add_argument("--server", metavar="BIN", default="./target/release/attncache-server",
                   help="the attncache-server binary (default: %(default)s)")
    p.add_argument("--rounds", metavar="R", type=int, default=5,
                   help="measured rounds of single-128 and single-512, after one untimed"
                        " warm-up call per system; each round calls every system once, the"
                        " starting system rotating (default: %(default)s)")
    p.add_argument("--rounds-2048", metavar="R", type=int, default=3,
                   help="measured rounds of single-2048 (default: %(default)s)")
    p.add_argument("--batch-rounds", metavar="R", type=int, default=None,
                   help="measured rounds of batch-32 (default: --rounds)")
    p.add_argument("--concurrent-secs", metavar="S", type=float, default=30,
                   help="seconds of load each system gets in concurrent-8 (default: %(default)s)")
    p.add_argument("--threads", metavar="N", type=int, default=os.cpu_count(),
                   help="CPU threads: torch.set_num_threads(N) for sentence-transformers and"
                        " RAYON_NUM_THREADS=N for every server (default: the machine's cores,"
                        " %(default)s)")
    p.add_argument("--out", metavar="OUT", default=None,
                   help="output path without extension: writes OUT.json and OUT.md (default:"
                        " benches/results/peer, or benches/results/peer-quick with --quick)")
    p.add_argument("--startup-timeout", metavar="S", type=float, default=600,
                   help="seconds to wait for each server's `listening on` line"
                        " (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds, single-128 and single-512 only (no 2048), 1"
                        " batch-32 round, 5 s per system of concurrent-8")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.batch_rounds, a.concurrent_secs = 2, 1, 5
        a.lengths = [128, 512]
    else:
        a.lengths = [128, 512, 2048]
    if a.batch_rounds is None:
        a.batch_rounds = a.rounds
    if a.out is None:
        a.out = "benches/results/peer-quick" if a.quick else "benches/results/peer"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        log(f"warning: load average {load_at_start[0]:.2f} at start: something else is running,"
            " timings will be noisy")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(stop_servers)
    if not Path(args.server).is_file():
        sys.exit(f"peer-bench: no server binary at {args.server} (build it first)")
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"peer-bench: no model at {args.model} (run scripts/fetch-model)")
    if np is None:
        sys.exit("peer-bench: needs numpy, torch and sentence-transformers: run it with"
                 " .venv-reference/bin/python (scripts/reference-embeddings --setup)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    log(f"loading sentence-transformers model from {args.model} ({args.threads} threads)")
    model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
    model = model.to(torch.float32).eval()
    model.max_seq_length = 2048
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    assert dtypes == ["torch.float32"], dtypes
    try:
        attn_impl = model[0].auto_model.config._attn_implementation
    except Exception:
        attn_impl = None
    texts = Texts(model)

    logdir = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    servers = {}
    try:
        for name, flags in SERVERS.items():
            log(f"starting {name}: {shlex.join(flags)}")
            s = Server(name, args.server, args.model, flags, args.threads, logdir,
                       args.startup_timeout)
            _SERVERS.append(s)
            servers[name] = s
            log(f"{name} listening on 127.0.0.1:{s.port}")

        log("building texts")
        batch_texts = texts.batch()
        batch_tokens = [texts.count(t) for t in batch_texts]
        bench = Bench(args, model, servers, texts)
        bench.total = (sum(len(SINGLE_SYSTEMS) * (args.rounds_2048 if n == 2048 else args.rounds)
                           for n in args.lengths)
                       + len(BATCH_SYSTEMS) * args.batch_rounds + len(CONCURRENT_SYSTEMS))
        for n in args.lengths:
            bench.single(n, args.rounds_2048 if n == 2048 else args.rounds)
        bench.batch(batch_texts, batch_tokens, args.batch_rounds)
        bench.stages["batch-32"]["texts"] = batch_texts
        bench.concurrent(batch_texts, batch_tokens, args.concurrent_secs)
    finally:
        stop_servers()

    wall = time.perf_counter() - t_start
    result = top_level(bench.stages)
    result["meta"] = {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "versions": {"torch": torch.__version__,
                     "sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "python": platform.python_version(),
                     "attncache_server": server_version(args.server)},
        "threads": args.threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_attn_implementation": attn_impl,
        "machine": machine(),
        "model": os.path.abspath(args.model),
        "prompt": PROMPT,
        "servers": {n: s.argv[1:] for n, s in servers.items()},
        "quick": args.quick,
        "wall_s": round(wall, 1),
        "loadavg_at_start": load_at_start,
        "odd": bench.odd,
    }
    result["stages"] = bench.stages
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    md_path.write_text(md)
    print(md)
    log(f"wrote {json_path} and {md_path} in {wall:.0f} s (server logs in {logdir})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_servers()
        log("interrupted")
        sys.exit(130)

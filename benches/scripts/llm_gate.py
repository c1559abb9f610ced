#!/usr/bin/env python3
"""Fit the decoder blend gate: a bound on the stale deviation a blend hit reports, from the
blend hits `llm_eval.py` recorded, written as the file `attncache-server --blend-gate` reads
for a GGUF decoder.

Every blend hit of the rows files is a point (kind, stale deviation, |error|): the kind is
the spam pair's mined group or ``rerank``; the error is |p(yes) blend − p(yes) exact| of the
spam prompt, or of each reranked passage's score. The bound is the largest stale deviation
up to which every calibration hit is within ``--tolerance / 2`` (half the tolerance is the
margin for hits not seen); the server takes a hit only when its stale deviation is at or
under it (the file's ``stale_below`` is the next float up) and computes the others exactly
from the check layer on. With n calibration hits under the bound and none outside half
the tolerance, a new hit exchangeable with them lands outside half the tolerance with
probability at most 1/(n+1) (the split-conformal argument); the file records n.

Leave-one-kind-out: for each kind with at least ``--min-kind`` hits, the bound is refitted
without it and the kind judged under it (hits taken, the largest error of those taken,
those outside the tolerance). The served check of a gate is llm_eval.py run with
``--blend-flags "--blend-gate FILE"`` on pairs and queries the fit never saw.

Every rows file must come from one blend setting (check layer and share), which the gate
records: a bound holds for the setting it was fitted with. The model's fingerprint comes
from a server started on ``--model`` (``/info``), so the file names the model it is for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_bench  # noqa: E402

KIND = "decoder_blend_stale"
DEFAULT_CHECK_LAYER, DEFAULT_SHARE = 1, 0.15


def setting_of(stage: dict) -> tuple[int, float]:
    """The (check layer, share) a stage's blend server ran with: what it recorded from
    /info, else its --blend-flags over the server's defaults."""
    if stage.get("decoder_blend"):
        return stage["decoder_blend"]["check_layer"], stage["decoder_blend"]["share"]
    flags = shlex.split(stage.get("blend_flags") or "")
    layer, share = DEFAULT_CHECK_LAYER, DEFAULT_SHARE
    for flag, value in zip(flags, flags[1:]):
        if flag == "--decoder-blend-check-layer":
            layer = int(value)
        elif flag == "--decoder-blend-share":
            share = float(value)
    return layer, share


def hits_of(path: Path) -> tuple[list[tuple[str, float, float]], dict]:
    """The blend hits of one llm_eval.py result (kind, stale, |error|) and its provenance."""
    stages = json.loads(path.read_text())["stages"]
    points, about = [], {}
    for name, stage in stages.items():
        if name == "spam":
            for r in stage["rows"]:
                b = r["blend"]
                if b["outcome"] == "blend_hit" and b.get("stale") is not None:
                    points.append((r["group"], b["stale"], abs(b["p_yes"] - r["exact"]["p_yes"])))
        elif name == "rerank":
            for q in stage["rows"]:
                b = q["blend"]
                for s, o, e, got in zip(b.get("stale", []), b["outcomes"], q["exact"]["scores"],
                                        b["scores"]):
                    if o == "blend_hit" and s is not None:
                        points.append(("rerank", s, abs(got - e)))
        else:
            continue
        about[name] = {"commit": stage.get("commit"), "setting": setting_of(stage),
                       "seed": stage.get("seed"), "pair_offset": stage.get("pair_offset", 0)}
    return points, about


def next_f32(x: float) -> float:
    """The next float32 above the float32 nearest `x` (the server reads the bound as f32 and
    takes a hit whose deviation is strictly below it)."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def fit(points: list, tolerance: float) -> tuple[float, int]:
    """The largest stale deviation up to which every point is within tolerance / 2, and the
    number of points at or under it (0.0 and 0 when the smallest already fails)."""
    bound, under = 0.0, 0
    for s, e in sorted((s, e) for _, s, e in points):
        if e > tolerance / 2:
            break
        bound, under = s, under + 1
    return bound, under


def leave_one_kind_out(points: list, tolerance: float, min_kind: int) -> list[dict]:
    out = []
    for kind in sorted({k for k, _, _ in points}):
        test = [(s, e) for k, s, e in points if k == kind]
        if len(test) < min_kind:
            continue
        bound, under = fit([p for p in points if p[0] != kind], tolerance)
        taken = [e for s, e in test if s <= bound]
        out.append({"kind": kind, "hits": len(test), "bound": bound, "calibration_under": under,
                    "taken": len(taken), "max_error_taken": max(taken, default=0.0),
                    "outside_tolerance": sum(e > tolerance for e in taken)})
    return out


def fingerprint(server: str, model: str) -> dict:
    """The served model's fingerprint and layers, from a server's /info."""
    logdir = Path("target/llm-gate")
    logdir.mkdir(parents=True, exist_ok=True)
    s = peer_bench.Server("gate-fit", server, model, [], 2, logdir, 300)
    peer_bench._SERVERS.append(s)
    try:
        conn = s._conn()
        conn.request("GET", "/info")
        info = json.loads(conn.getresponse().read())
        return {"fingerprint": info["model_fingerprint"], "name": info["model_name"],
                "layers": info["layers"], "file": Path(model).name}
    finally:
        peer_bench.stop_servers()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True,
                   help="comma-separated llm_eval.py results (OUT.json) whose blend hits calibrate")
    p.add_argument("--model", required=True, help="the GGUF file the rows were served with")
    p.add_argument("--server", required=True, help="the attncache-server binary (reads the "
                                                    "model's fingerprint from /info)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest |p(yes) error| an accepted hit may have; calibration hits under "
                        "the bound are held to half of it")
    p.add_argument("--min-kind", type=int, default=10,
                   help="kinds with fewer hits are not judged alone in leave-one-kind-out")
    p.add_argument("--out", required=True, help="the gate file to write (JSON)")
    p.add_argument("--report", help="where the markdown report goes (default: OUT with .md)")
    args = p.parse_args()
    t0 = time.perf_counter()
    points, sources = [], {}
    for f in [Path(x) for x in args.rows.split(",") if x]:
        got, about = hits_of(f)
        points += got
        sources[str(f)] = about
    settings = {tuple(a["setting"]) for about in sources.values() for a in about.values()}
    if len(settings) != 1:
        p.error(f"the rows come from several blend settings (check layer, share): {sorted(settings)}")
    (check_layer, share), = settings
    if not points:
        p.error("no blend hits with a stale deviation in the rows")
    bound, under = fit(points, args.tolerance)
    kinds = {k: sum(1 for q, _, _ in points if q == k) for k in sorted({k for k, _, _ in points})}
    lokko = leave_one_kind_out(points, args.tolerance, args.min_kind)
    model = fingerprint(args.server, args.model)
    gate = {
        "kind": KIND,
        "model": model,
        "check_layer": check_layer,
        "share": share,
        "stale_below": next_f32(bound),
        "tolerance": args.tolerance,
        "target": (f"every calibration hit with a stale deviation at or under the bound is within "
                   f"{args.tolerance / 2} of exact (half the tolerance {args.tolerance}); a hit "
                   f"exchangeable with them falls outside that with probability at most "
                   f"1/(n+1), n = calibration.hits_under_bound"),
        "calibration": {"sources": sources, "hits": len(points), "kinds": kinds,
                        "hits_under_bound": under, "bound": bound,
                        "max_error_under_bound": max((e for _, s, e in points if s <= bound),
                                                     default=0.0)},
        "leave_one_kind_out": lokko,
        "fitted": {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"), "commit": peer_bench.git_commit(),
            "script": "benches/scripts/llm_gate.py"},
    }
    out = Path(args.out)
    out.write_text(json.dumps(gate, indent=1) + "\n")
    lines = [
        f"# Decoder blend gate for {model['file']}",
        "",
        f"Check layer {check_layer}, share {share}; tolerance {args.tolerance}. Fitted on "
        f"{len(points)} blend hits ({', '.join(f'{k} {n}' for k, n in kinds.items())}) from "
        f"{', '.join(sources)}; {gate['fitted']['commit']}, {gate['fitted']['date']}.",
        "",
        f"- bound (stale deviation): **{bound:.5f}**, {under} calibration hits at or under it, "
        f"the largest error among them {gate['calibration']['max_error_under_bound']:.4f}",
        "",
        "Leave one kind out (the bound refitted without the kind, the kind judged under it):",
        "",
        "| kind left out | its hits | bound | calibration hits under it | taken | largest error taken | outside the tolerance |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['kind']} | {r['hits']} | {r['bound']:.5f} | {r['calibration_under']} | {r['taken']} "
          f"| {r['max_error_taken']:.4f} | {r['outside_tolerance']} |" for r in lokko],
        "",
    ]
    Path(args.report or out.with_suffix(".md")).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"llm-gate: wrote {out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

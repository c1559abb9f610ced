//! Blend reuse (`--reuse blend`) through the real server and the tiny model: a stored
//! neighbour's per-layer K/V and hidden states, with the positions that deviate after the
//! check layer recomputed.
//!
//! - S = every position gives the exact output (within 1e-5), for an identical input, a
//!   one-token edit and an insertion (positions shifted, the stored K aligned);
//! - an identical stored input with S = ∅ gives the stored embedding back;
//! - a refused blend hit equals flag off, and is reported and counted as a miss; no
//!   `/metrics` counter falls while candidates are looked up and refused;
//! - a damaged blend entry on disk is a miss plus a warning, and is replaced;
//! - blend entries and map entries do not mix;
//! - int8 K/V entries are smaller, give a near hit close to the f16 one, and a server of
//!   either `--blend-kv` reads entries of both;
//! - escalation (`--blend-resume-layer`, a 3-layer tiny model): a hit the fast rule refuses
//!   runs S up to the resume layer and every position after it; with S = every position it is
//!   exact, with a small S it is closer to exact than the same S without escalation, and an
//!   entry recorded without resume states is refused as before;
//! - dilution (`--blend-dilution`): a local edit to an input longer than the window moves
//!   only part of it, and the padding follows the share that moved; an insertion (a shift)
//!   is never diluted;
//! - a lookup on its own thread during layer 0 (`--blend-lookup-overlap-from`), its entry
//!   read from disk after a restart, serves the same hits, misses and embeddings as one
//!   before layer 0.

use crate::common;

use common::{embeddings_of, metric, outcomes, Server, TinyModel};
use serde_json::{json, Value};

/// Largest element-wise difference from flag off when every position is recomputed.
pub(super) const MAX_ABS_DIFF: f32 = 1e-5;

/// Flags under which the fast rule refuses every near hit of `base_ids` with one token
/// changed at the check layer: every moved state must be recomputed, and at most 10% of the
/// input may be.
const CHECK_REFUSES: [&str; 6] = [
    "--blend-max-deviation",
    "0",
    "--blend-max-share",
    "0.1",
    "--blend-min-share",
    "0",
];

pub(super) fn post(server: &Server, ids: &[u32], flag: bool) -> Value {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"model": "default", "input": [ids], "attn_cache": flag}))
        .send()
        .expect("request");
    let status = resp.status();
    let body: Value = resp.json().expect("json body");
    assert_eq!(status, 200, "{body}");
    body
}

pub(super) fn embedding(body: &Value) -> Vec<f32> {
    embeddings_of(body).remove(0)
}

pub(super) fn report(body: &Value) -> &Value {
    &body["attn_cache"]["inputs"][0]
}

pub(super) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// 40 token ids, longer than the tiny model's window (5 after the conformance fix).
fn base_ids() -> Vec<u32> {
    (0..40u32).map(|i| 1 + (i * 7) % 59).collect()
}

/// A blend server with `extra` flags; every hit the rules accept is taken (`--blend-min-gain
/// 0`) unless `extra` sets the smallest gain itself: the tiny model's few short layers are
/// not the cost model the default is fitted to.
pub(super) fn blend_server(model: &TinyModel, extra: &[&str]) -> Server {
    let mut args = vec!["--reuse", "blend", "--repeat-mib", "0"];
    if !extra.contains(&"--blend-min-gain") {
        args.extend(["--blend-min-gain", "0"]);
    }
    args.extend_from_slice(extra);
    Server::start(model, &args)
}

#[test]
fn recomputing_every_position_gives_the_exact_output() {
    let model = TinyModel::new("blend-all");
    // smallest share 1: every position is recomputed once any state moved (an identical
    // input's states do not move: nothing is, and the stored f32 states are its own)
    let server = blend_server(
        &model,
        &["--blend-max-share", "1", "--blend-min-share", "1"],
    );
    let a = base_ids();
    let mut edited = a.clone();
    edited[17] = 58;
    let mut inserted = a.clone();
    inserted.insert(20, 33);

    let stored = post(&server, &a, true);
    assert_eq!(outcomes(&stored), ["miss"]);
    for (what, ids, outcome) in [
        ("identical", &a, "hit"),
        ("one token edited", &edited, "near_hit"),
        ("one token inserted", &inserted, "near_hit"),
    ] {
        let exact = embedding(&post(&server, ids, false));
        let body = post(&server, ids, true);
        assert_eq!(outcomes(&body), [outcome], "{what}: {body}");
        let r = report(&body);
        let recomputed = r["recomputed_tokens"].as_u64().expect("recomputed_tokens");
        let want = if what == "identical" {
            0
        } else {
            ids.len() as u64
        };
        assert_eq!(recomputed, want, "{what}: {r}");
        let diff = max_diff(&embedding(&body), &exact);
        eprintln!(
            "{what}: {recomputed} of {} positions recomputed, max |diff| {diff:.2e}",
            ids.len()
        );
        assert!(
            diff <= MAX_ABS_DIFF,
            "{what}: max |diff| {diff} from flag off"
        );
        if what == "one token inserted" {
            assert_eq!(r["differing_tokens"], 1, "{r}");
        }
    }
    let m = server.metrics();
    assert!(metric(&m, "attncache_blend_hits_total") >= 3.0, "{m}");
    assert_eq!(metric(&m, "attncache_recomputed_tokens_total"), 81.0, "{m}");
}

#[test]
fn an_identical_input_with_nothing_recomputed_gives_the_stored_embedding() {
    let model = TinyModel::new("blend-none");
    // a bound no deviation reaches: S is empty, the stored final states are the output
    let server = blend_server(&model, &["--blend-max-deviation", "1000"]);
    let a = base_ids();
    let first = embedding(&post(&server, &a, true));
    let body = post(&server, &a, true);
    assert_eq!(outcomes(&body), ["hit"]);
    assert_eq!(report(&body)["recomputed_tokens"], 0, "{body}");
    let again = embedding(&body);
    // the stored final states are f32: the embedding is the stored input's
    assert!(max_diff(&first, &again) <= MAX_ABS_DIFF);
}

/// A server that recomputes every moved state (bound 0) but at most `max_share` of the
/// input; `a` stored, then `b` (one token of `a` changed) asked with the flag off and on.
/// Returns the server, `b`, its exact embedding and the flag-on response.
fn refused_near_hit(model: &TinyModel, max_share: &str) -> (Server, Vec<u32>, Vec<f32>, Value) {
    let server = blend_server(
        model,
        &[
            "--blend-max-deviation",
            "0",
            "--blend-max-share",
            max_share,
            "--blend-min-share",
            "0",
        ],
    );
    let a = base_ids();
    let mut b = a.clone();
    b[10] = 57;
    post(&server, &a, true);
    let exact = embedding(&post(&server, &b, false));
    let body = post(&server, &b, true);
    (server, b, exact, body)
}

/// Recomputed positions of a one-token edit in the middle of `base_ids` (40 tokens; the tiny
/// model's window moves only the positions near the edit at the check layer), served by a
/// server that recomputes every position that moved and pads to 40% of the input, its bounds
/// diluted with the exponent `dilution`; and the hit's cosine to flag off.
fn recomputed_with_dilution(model: &TinyModel, dilution: &str) -> (u64, f32) {
    let mut b = base_ids();
    b[20] = 57;
    let body = diluted_near_hit(model, dilution, "0", &b);
    assert_eq!(outcomes(&body.0), ["near_hit"], "{}", body.0);
    let recomputed = report(&body.0)["recomputed_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}", body.0));
    (recomputed, body.1)
}

/// The flag-on reply to `b` (and its cosine to flag off) after `base_ids` was stored, on a
/// server that recomputes every position that moved by more than `max_deviation` and pads to
/// 40% of the input (at most 50%), its bounds diluted with the exponent `dilution`.
fn diluted_near_hit(
    model: &TinyModel,
    dilution: &str,
    max_deviation: &str,
    b: &[u32],
) -> (Value, f32) {
    let server = blend_server(
        model,
        &[
            "--blend-max-deviation",
            max_deviation,
            "--blend-max-share",
            "0.5",
            "--blend-min-share",
            "0.4",
            "--blend-dilution",
            dilution,
        ],
    );
    let a = base_ids();
    post(&server, &a, true);
    let exact = embedding(&post(&server, b, false));
    let body = post(&server, b, true);
    let cos = cosine(&embedding(&body), &exact);
    (body, cos)
}

#[test]
fn dilution_recomputes_less_when_only_part_of_the_input_moved() {
    let model = TinyModel::new("blend-dilution");
    // no dilution: padded to 40% of the 40 positions
    let (plain, _) = recomputed_with_dilution(&model, "0");
    assert_eq!(plain, 16);
    // exponent 1: padded to 40% of the positions that moved, all of which are over the
    // bound (0): exactly the moved positions, the edited one and its window neighbours
    let (diluted, cos) = recomputed_with_dilution(&model, "1");
    eprintln!("recomputed: {plain} without dilution, {diluted} with exponent 1 (cos {cos:.6})");
    assert!((2..16).contains(&diluted), "{diluted}");
    assert!(cos > 0.9, "{cos}");
}

#[test]
fn edits_in_two_places_are_not_diluted() {
    let model = TinyModel::new("blend-dilution-two-edits");
    // positions 1 and 38 changed: further apart than one edit, so the 40% padding applies
    // to the whole input whatever the exponent (one edit at 20 is diluted, above)
    let mut b = base_ids();
    b[1] = 57;
    b[38] = 58;
    for dilution in ["0", "1"] {
        let (body, _) = diluted_near_hit(&model, dilution, "0", &b);
        assert_eq!(outcomes(&body), ["near_hit"], "{body}");
        assert_eq!(report(&body)["recomputed_tokens"], 16, "{dilution}: {body}");
    }
}

#[test]
fn an_insertion_is_not_diluted() {
    let model = TinyModel::new("blend-dilution-shift");
    // one token inserted at 20 (the last one dropped): the positions before 13 keep their
    // check-layer states exactly, so the share that moved is under 1 and, diluted, the
    // smallest share (40%, as nothing else is over the deviation bound 1) would shrink; but a
    // shift is never diluted: the same decision at exponent 1 as at 0
    let a = base_ids();
    let mut b = a[..20].to_vec();
    b.push(57);
    b.extend_from_slice(&a[20..a.len() - 1]);
    let (plain, _) = diluted_near_hit(&model, "0", "1", &b);
    let (diluted, cos) = diluted_near_hit(&model, "1", "1", &b);
    let decision = |body: &Value| {
        (
            outcomes(body),
            report(body)["recomputed_tokens"].as_u64(),
            report(body)["resumed_after_layer"].as_u64(),
        )
    };
    eprintln!(
        "insertion: {:?} at exponent 0, {:?} at 1 (cos {cos:.6})",
        decision(&plain),
        decision(&diluted)
    );
    assert_eq!(outcomes(&plain), ["near_hit"], "{plain}");
    assert_eq!(decision(&plain), decision(&diluted));
}

#[test]
fn a_refused_blend_equals_flag_off() {
    let model = TinyModel::new("blend-refused");
    // nothing may stay outside S and S may hold 1% of the input: every near hit is refused
    let (server, _, exact, body) = refused_near_hit(&model, "0.01");
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(report(&body)["recomputed_tokens"].is_null(), "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_hits_total"), 0.0, "{m}");
    // b's candidate (a) had one differing token, within a 1% share only for 100+ tokens:
    // it is refused at lookup, never used
    assert_eq!(metric(&m, "attncache_recorded_total"), 2.0, "{m}");
}

#[test]
fn a_near_hit_is_refused_at_the_check_layer_and_recorded() {
    let model = TinyModel::new("blend-check-refused");
    // the differing token fits the share, but every moved state must be recomputed
    let (server, b, exact, body) = refused_near_hit(&model, "0.1");
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_recorded_total"), 2.0, "{m}");
    // b was recorded after its refusal: asked again it is its own candidate, whose states
    // (f32) do not move at all, so nothing is recomputed
    let again = post(&server, &b, true);
    assert_eq!(outcomes(&again), ["hit"], "{again}");
    assert_eq!(report(&again)["recomputed_tokens"], 0, "{again}");
    assert!(max_diff(&embedding(&again), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_recorded_total"), 2.0, "{m}");
}

/// Every `*_total` sample of a `/metrics` scrape (the families whose `# TYPE` is counter),
/// by sample name and labels.
fn counter_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| {
            let family = name.split('{').next().unwrap_or_default();
            families.iter().any(|f| family == format!("{f}_total"))
        })
        .filter_map(|(name, v)| Some((name.to_string(), v.parse().ok()?)))
        .collect()
}

#[test]
fn no_counter_falls_around_refused_blend_candidates() {
    let model = TinyModel::new("blend-counters");
    // as in `a_near_hit_is_refused_at_the_check_layer_and_recorded`: every candidate is
    // refused at the check layer
    let server = blend_server(&model, &CHECK_REFUSES);
    let a = base_ids();
    post(&server, &a, true);
    // a scraper that runs while the candidates are looked up and refused: no counter may
    // ever read lower than it read before
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (stop, url) = (stop.clone(), format!("{}/metrics", server.base));
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let mut seen = std::collections::BTreeMap::<String, f64>::new();
            let mut scrapes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = client
                    .get(&url)
                    .send()
                    .expect("scrape")
                    .text()
                    .expect("text");
                for (name, v) in counter_samples(&text) {
                    let before = seen.insert(name.clone(), v).unwrap_or(0.0);
                    assert!(v >= before, "{name} fell from {before} to {v}");
                }
                scrapes += 1;
            }
            scrapes
        })
    };
    let before = counter_samples(&server.metrics());
    const ASKED: u32 = 6;
    for i in 0..ASKED {
        let mut b = a.clone();
        b[10] = 50 + i; // one token from a and from every earlier b: a candidate each time
        let body = post(&server, &b, true);
        assert_eq!(outcomes(&body), ["miss"], "{body}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.join().expect("no counter fell");
    assert!(scrapes > 0);
    let after = counter_samples(&server.metrics());
    for (name, v) in &before {
        assert!(after[name] >= *v, "{name} fell from {v} to {}", after[name]);
    }
    let grew = |name: &str| after[name] - before[name];
    assert_eq!(grew("attncache_blend_candidates_total"), f64::from(ASKED));
    assert_eq!(grew("attncache_blend_refused_total"), f64::from(ASKED));
    assert_eq!(grew("attncache_misses_total"), f64::from(ASKED));
    assert_eq!(grew("attncache_hits_total"), 0.0);
    assert_eq!(grew("attncache_near_hits_total"), 0.0);
}

#[test]
fn a_damaged_blend_entry_is_a_miss_and_is_replaced() {
    let model = TinyModel::new("blend-damaged");
    let dir = std::env::temp_dir().join(format!("attncache-blend-damaged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_string_lossy().to_string();
    let a = base_ids();
    {
        let server = blend_server(&model, &["--cache-dir", &dir_s]);
        assert_eq!(outcomes(&post(&server, &a, true)), ["miss"]);
        wait_for_files(&dir, 1); // the cold tier is written in the background
    }
    let files: Vec<_> = walk(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&files[0], &bytes).unwrap();

    let server = blend_server(&model, &["--cache-dir", &dir_s]);
    let exact = embedding(&post(&server, &a, false));
    let body = post(&server, &a, true);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_corrupt_entries_total"), 1.0, "{m}");
    assert_eq!(outcomes(&post(&server, &a, true)), ["hit"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Positions chosen by share alone: a deviation bound no state reaches, 30% of the input,
/// any share allowed, no dilution.
pub(super) const BY_SHARE_30: [&str; 8] = [
    "--blend-max-deviation",
    "1000",
    "--blend-min-share",
    "0.3",
    "--blend-max-share",
    "1",
    "--blend-dilution",
    "0",
];

/// Stores `a` on a blend server keeping K/V as `kv` in `dir`, then asks `b`: the file's size
/// and `b`'s response. Positions are chosen by share alone (a bound no deviation reaches, 30%
/// of the input), so most of `b`'s attention reads the stored K/V.
fn near_hit_with_kv(
    model: &TinyModel,
    kv: &str,
    dir: &std::path::Path,
    a: &[u32],
    b: &[u32],
) -> (u64, Value) {
    let _ = std::fs::remove_dir_all(dir);
    let dir_s = dir.to_string_lossy().to_string();
    let mut args = vec!["--cache-dir", &dir_s, "--blend-kv", kv];
    args.extend_from_slice(&BY_SHARE_30);
    let server = blend_server(model, &args);
    assert_eq!(outcomes(&post(&server, a, true)), ["miss"]);
    wait_for_files(dir, 1);
    let size = std::fs::metadata(&walk(dir)[0]).unwrap().len();
    let body = post(&server, b, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{kv}: {body}");
    (size, body)
}

#[test]
fn int8_entries_are_smaller_close_to_f16_and_either_format_is_read() {
    let model = TinyModel::new("blend-int8");
    let base = std::env::temp_dir().join(format!("attncache-blend-int8-{}", std::process::id()));
    let a = base_ids();
    let mut b = a.clone();
    b[17] = 58;
    let (f16_bytes, f16_body) = near_hit_with_kv(&model, "f16", &base.join("f16"), &a, &b);
    let (int8_bytes, int8_body) = near_hit_with_kv(&model, "int8", &base.join("int8"), &a, &b);
    for body in [&f16_body, &int8_body] {
        assert_eq!(report(body)["recomputed_tokens"], 12, "{body}"); // ceil(0.3 · 40)
    }
    let (e16, e8) = (embedding(&f16_body), embedding(&int8_body));
    let cos = e16.iter().zip(&e8).map(|(x, y)| x * y).sum::<f32>()
        / (e16.iter().map(|x| x * x).sum::<f32>().sqrt()
            * e8.iter().map(|x| x * x).sum::<f32>().sqrt());
    eprintln!(
        "entry bytes: f16 {f16_bytes}, int8 {int8_bytes}; near hit cos(int8, f16) {cos:.6}, max |diff| {:.2e}",
        max_diff(&e16, &e8)
    );
    assert!(
        int8_bytes < f16_bytes,
        "int8 {int8_bytes} >= f16 {f16_bytes}"
    );
    // int8 moves each K/V value by at most half a step of its row (1/254 of its largest)
    assert!(cos >= 0.999, "cos(int8 near hit, f16 near hit) {cos}");
    assert!(e8 != e16, "the int8 entry was not the one used");
    // a server recording int8 reads the f16 entries (and gives the f16 near hit exactly)
    let dir_s = base.join("f16").to_string_lossy().to_string();
    let server = blend_server(
        &model,
        &[
            &["--cache-dir", &dir_s, "--blend-kv", "int8"],
            &BY_SHARE_30[..],
        ]
        .concat(),
    );
    assert_eq!(outcomes(&post(&server, &a, true)), ["hit"]);
    let body = post(&server, &b, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    assert!(max_diff(&embedding(&body), &e16) <= MAX_ABS_DIFF);
    drop(server);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn blend_and_map_entries_do_not_mix() {
    let model = TinyModel::new("blend-kinds");
    let dir = std::env::temp_dir().join(format!("attncache-blend-kinds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_string_lossy().to_string();
    let a = base_ids();
    {
        let maps = Server::start(&model, &["--repeat-mib", "0", "--cache-dir", &dir_s]);
        assert_eq!(outcomes(&post(&maps, &a, true)), ["miss"]);
        assert_eq!(outcomes(&post(&maps, &a, true)), ["hit"]);
        wait_for_files(&dir, 1);
    }
    // the map entry is no blend entry: a miss, then recorded as a blend entry
    let blend = blend_server(&model, &["--cache-dir", &dir_s]);
    let exact = embedding(&post(&blend, &a, false));
    let body = post(&blend, &a, true);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    assert_eq!(outcomes(&post(&blend, &a, true)), ["hit"]);
    drop(blend);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flags of a server whose fast rule refuses every near hit of `base_ids` with one token
/// changed ([`CHECK_REFUSES`]), escalating it after layer 1 with `escalate_share` of the
/// positions.
fn escalating(escalate_share: &'static str) -> Vec<&'static str> {
    let mut flags = CHECK_REFUSES.to_vec();
    flags.extend([
        "--blend-resume-layer",
        "1",
        "--blend-escalate-share",
        escalate_share,
    ]);
    flags
}

pub(super) fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
        * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

#[test]
fn an_escalated_hit_over_every_position_is_exact() {
    let model = TinyModel::with_layers("blend-escalate-all", 3);
    let server = blend_server(&model, &escalating("1"));
    let a = base_ids();
    let mut edited = a.clone();
    edited[17] = 58;
    let mut inserted = a.clone();
    inserted.insert(20, 33);
    assert_eq!(outcomes(&post(&server, &a, true)), ["miss"]);
    for (what, ids) in [
        ("one token edited", &edited),
        ("one token inserted", &inserted),
    ] {
        let exact = embedding(&post(&server, ids, false));
        let body = post(&server, ids, true);
        assert_eq!(outcomes(&body), ["near_hit"], "{what}: {body}");
        let r = report(&body);
        assert_eq!(r["resumed_after_layer"], 1, "{what}: {r}");
        assert_eq!(r["recomputed_tokens"], ids.len() as u64, "{what}: {r}");
        let diff = max_diff(&embedding(&body), &exact);
        eprintln!("escalated, {what}: max |diff| {diff:.2e}");
        assert!(
            diff <= MAX_ABS_DIFF,
            "{what}: max |diff| {diff} from flag off"
        );
    }
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_escalated_total"), 2.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 0.0, "{m}");
}

#[test]
fn an_escalated_hit_is_closer_to_exact_than_the_same_positions_without_it() {
    let model = TinyModel::with_layers("blend-escalate-few", 3);
    let a = base_ids();
    let mut b = a.clone();
    b[17] = 58;
    // escalated with 20% of the positions up to layer 1, every position in layer 2
    let server = blend_server(&model, &escalating("0.2"));
    post(&server, &a, true);
    let exact = embedding(&post(&server, &b, false));
    let body = post(&server, &b, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    assert_eq!(report(&body)["resumed_after_layer"], 1, "{body}");
    assert_eq!(report(&body)["recomputed_tokens"], 8, "{body}"); // 20% of 40
    let escalated = cosine(&embedding(&body), &exact);
    drop(server);
    // the fast rule with the same share, in every layer after the check layer
    let server = blend_server(
        &model,
        &[
            "--blend-max-deviation",
            "1000",
            "--blend-min-share",
            "0.2",
            "--blend-max-share",
            "0.2",
            "--blend-dilution",
            "0",
        ],
    );
    post(&server, &a, true);
    let body = post(&server, &b, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    assert!(report(&body)["resumed_after_layer"].is_null(), "{body}");
    assert_eq!(report(&body)["recomputed_tokens"], 8, "{body}");
    let fast = cosine(&embedding(&body), &exact);
    eprintln!("cos to exact, 20% of the positions: escalated {escalated:.6}, fast {fast:.6}");
    assert!(escalated > fast, "escalated {escalated} <= fast {fast}");
    assert!(
        escalated < 1.0 - 1e-7,
        "escalated {escalated}: nothing was stale"
    );
}

#[test]
fn an_entry_without_resume_states_is_refused_as_before() {
    let model = TinyModel::with_layers("blend-escalate-old", 3);
    let dir = std::env::temp_dir().join(format!("attncache-blend-old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_string_lossy().to_string();
    let a = base_ids();
    let mut b = a.clone();
    b[17] = 58;
    {
        // recorded by a server without escalation: no states after layer 1
        let server = blend_server(
            &model,
            &["--cache-dir", &dir_s, "--blend-resume-layer", "off"],
        );
        assert_eq!(outcomes(&post(&server, &a, true)), ["miss"]);
        wait_for_files(&dir, 1);
    }
    let mut args = vec!["--cache-dir", dir_s.as_str()];
    args.extend(escalating("0.2"));
    let server = blend_server(&model, &args);
    let exact = embedding(&post(&server, &b, false));
    let body = post(&server, &b, true);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_escalated_total"), 0.0, "{m}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (up to 30 s) until `dir` holds `n` entry files.
pub(super) fn wait_for_files(dir: &std::path::Path, n: usize) {
    let start = std::time::Instant::now();
    while walk(dir).len() < n {
        assert!(
            start.elapsed().as_secs() < 30,
            "no entry file in {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub(super) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "attn") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Stores `a` in `dir`, restarts (the hot tier empty: the entry is read from disk by the
/// first lookup), then asks a near duplicate of `a`, `a` again and a longer input, with
/// the lookup before layer 0 (`overlap` "off") or during it ("0"): outcomes, embeddings,
/// recomputed positions. Positions are chosen by share alone (30%), so the near duplicate is
/// a blend hit whatever its deviations.
fn served_after_restart(
    model: &TinyModel,
    dir: &std::path::Path,
    overlap: &str,
) -> Vec<(String, Vec<f32>, Value)> {
    let _ = std::fs::remove_dir_all(dir);
    let dir_s = dir.to_string_lossy().to_string();
    let args = [
        &[
            "--cache-dir",
            dir_s.as_str(),
            "--blend-lookup-overlap-from",
            overlap,
        ],
        &BY_SHARE_30[..],
    ]
    .concat();
    let a = base_ids();
    {
        let server = blend_server(model, &args);
        assert_eq!(outcomes(&post(&server, &a, true)), ["miss"]);
        wait_for_files(dir, 1);
    }
    let server = blend_server(model, &args);
    let mut near = a.clone();
    near[17] = 58;
    // longer than the length slack allows: no candidate
    let other: Vec<u32> = (0..52u32).map(|i| 2 + (i * 11) % 53).collect();
    let served = [near, a, other]
        .iter()
        .map(|ids| {
            let body = post(&server, ids, true);
            let outcome = outcomes(&body).remove(0);
            (
                outcome,
                embedding(&body),
                report(&body)["recomputed_tokens"].clone(),
            )
        })
        .collect();
    let m = server.metrics();
    assert_eq!(
        metric(&m, "attncache_cold_hits_total"),
        1.0,
        "{overlap}: {m}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    served
}

#[test]
fn a_lookup_during_layer_0_serves_the_same_as_one_before_it() {
    let model = TinyModel::new("blend-overlap");
    let base = std::env::temp_dir().join(format!("attncache-blend-overlap-{}", std::process::id()));
    let before = served_after_restart(&model, &base.join("before"), "off");
    let during = served_after_restart(&model, &base.join("during"), "0");
    let outcomes: Vec<&str> = during.iter().map(|(o, _, _)| o.as_str()).collect();
    assert_eq!(outcomes, ["near_hit", "hit", "miss"]);
    for ((o1, e1, r1), (o2, e2, r2)) in before.iter().zip(&during) {
        assert_eq!((o1, r1), (o2, r2));
        assert!(
            max_diff(e1, e2) <= MAX_ABS_DIFF,
            "{o1}: {}",
            max_diff(e1, e2)
        );
    }
}

#[test]
fn contradictory_blend_settings_are_refused_at_start() {
    let model = TinyModel::new("blend-bad-flags");
    // the server must exit with an error whose text names the bad setting
    let refused = |args: &[&str], says: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .args(Server::args(&model, args))
            .output()
            .expect("run attncache-server");
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    let shares = [
        "--reuse",
        "blend",
        "--blend-min-share",
        "0.6",
        "--blend-max-share",
        "0.5",
    ];
    refused(&shares, "blend.min_recompute_share");
    refused(&["--reuse", "sometimes"], "maps or blend");
    refused(
        &["--reuse", "blend", "--blend-dilution", "inf"],
        "blend.dilution",
    );
    refused(
        &["--reuse", "blend", "--blend-lookup-overlap-from", "soon"],
        "neither a number of tokens nor `off`",
    );
    refused(
        &["--reuse", "blend", "--blend-fixed-tokens", "inf"],
        "blend.fixed_tokens",
    );
    refused(
        &["--reuse", "blend", "--blend-min-gain", "NaN"],
        "blend.min_gain",
    );
    for rate in ["1.5", "-0.1", "NaN"] {
        let flag = format!("--blend-audit-rate={rate}");
        refused(&["--reuse", "blend", &flag], "is not a share in [0, 1]");
    }
}

#[test]
fn a_hit_that_would_not_pay_is_refused_and_exact() {
    let model = TinyModel::new("blend-min-gain");
    let a = base_ids();
    let mut b = a.clone();
    b[10] = 57;
    // positions by share alone (30% of 40): with no fixed cost a layer after the check layer
    // costs 12 rows of 40, a gain over 1 that a demand of 100x refuses
    let served = |min_gain: &'static str| {
        let mut args = vec!["--blend-min-gain", min_gain, "--blend-fixed-tokens", "0"];
        args.extend_from_slice(&BY_SHARE_30);
        let server = blend_server(&model, &args);
        post(&server, &a, true);
        let exact = embedding(&post(&server, &b, false));
        let body = post(&server, &b, true);
        (server, exact, body)
    };
    let (server, exact, body) = served("100");
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_unprofitable_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_hits_total"), 0.0, "{m}");
    // and not recorded: a near duplicate of it would not pay either (a alone is stored)
    assert_eq!(metric(&m, "attncache_recorded_total"), 1.0, "{m}");
    // a demand the hit meets: taken, and not exact
    let (server, exact, body) = served("1.01");
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    assert_eq!(report(&body)["recomputed_tokens"], 12, "{body}");
    assert!(max_diff(&embedding(&body), &exact) > MAX_ABS_DIFF);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_unprofitable_total"), 0.0, "{m}");
}

/// The value of `name` in a fresh scrape, once `done` holds for it (or after 60 s).
fn metric_once(server: &Server, name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = metric(&server.metrics(), name);
        if done(v) || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_audit_measures_what_a_near_blend_hit_cost() {
    let model = TinyModel::new("blend-audit");
    // positions chosen by share alone (30%): a one-token edit is a near hit that is not exact
    let mut args = vec!["--blend-audit-rate", "1"];
    args.extend_from_slice(&BY_SHARE_30);
    let server = blend_server(&model, &args);
    let info: Value = reqwest::blocking::get(format!("{}/info", server.base))
        .and_then(|r| r.json())
        .expect("/info");
    assert_eq!(info["attn_cache"]["blend_audit_rate"], 1.0, "{info}");
    let a = base_ids();
    let mut b = a.clone();
    b[10] = 57;
    post(&server, &a, true);
    let exact = embedding(&post(&server, &b, false));
    let body = post(&server, &b, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    let cos = attncache_server::local_server::cosine(&embedding(&body), &exact);
    assert!(cos < 1.0 - 1e-7, "the hit is not exact: {cos}");
    // the audit runs after the answer: its one observation is the hit's cosine to exact
    let count = metric_once(&server, "attncache_blend_audit_fidelity_count", |v| {
        v >= 1.0
    });
    assert_eq!(count, 1.0);
    let m = server.metrics();
    let audited = metric(&m, "attncache_blend_audit_fidelity_sum");
    assert!(
        (audited - cos).abs() < 1e-6,
        "audited {audited}, measured {cos}"
    );
    assert_eq!(
        metric(&m, "attncache_blend_audits_skipped_total"),
        0.0,
        "{m}"
    );
    // the audit's exact run is not an input of its own: one flag-off input, b's
    let off = m
        .lines()
        .find(|l| l.starts_with("attncache_inputs_total{outcome=\"off\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(off, Some(1.0), "{m}");
}

/// A fidelity gate file of one band whose fast rule takes hits with a pooled deviation of at
/// most `max_signal` (`None`: none), and no escalated hit. (The pooled deviation, since the
/// tiny model's short window moves few positions and the test's S holds them all: nothing
/// stale.)
pub(super) fn gate_file(dir: &std::path::Path, max_signal: Option<f32>) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("gate.json");
    let rule = |max: Option<f32>| {
        json!({"signal": "pooled", "max_signal": max, "calibration_hits": 120,
        "calibration_below_floor": 0, "bound": 1.0 / 121.0})
    };
    let gate = json!({"floor": 0.99, "target_below_floor": 0.01,
        "bands": [{"min_tokens": 0, "fast": rule(max_signal), "escalated": rule(None)}],
        "calibration": {"by": "a test"}});
    std::fs::write(&path, gate.to_string()).unwrap();
    path
}

#[test]
fn the_fidelity_gate_refuses_a_hit_over_its_bound_and_the_refusal_is_exact() {
    let model = TinyModel::new("blend-gate");
    let dir = std::env::temp_dir().join(format!("attncache-blend-gate-{}", std::process::id()));
    let a = base_ids();
    let mut b = a.clone();
    b[10] = 57;
    let served = |max_signal: Option<f32>| {
        let gate = gate_file(&dir, max_signal);
        let gate = gate.to_string_lossy().to_string();
        let mut args = vec!["--blend-gate", &gate];
        args.extend_from_slice(&BY_SHARE_30);
        let server = blend_server(&model, &args);
        post(&server, &a, true);
        let exact = embedding(&post(&server, &b, false));
        let body = post(&server, &b, true);
        (server, exact, body)
    };
    // a bound the hit's signal exceeds: refused, exact, counted, the signal reported
    let (server, exact, body) = served(Some(0.0));
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let pooled = report(&body)["check"]["pooled_deviation"].as_f64().unwrap();
    assert!(pooled > 0.0, "{body}");
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_gate_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_refused_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_hits_total"), 0.0, "{m}");
    let info: Value = reqwest::blocking::get(format!("{}/info", server.base))
        .unwrap()
        .json()
        .unwrap();
    let gate = &info["attn_cache"]["blend_gate"];
    assert_eq!(gate["bands"][0]["fast"]["signal"], "pooled", "{info}");
    assert_eq!(gate["target_below_floor"], 0.01, "{info}");
    assert_eq!(gate["calibration"]["by"], "a test", "{info}");
    drop(server);
    // a bound over that signal: taken, with the same signal, not exact
    let (server, exact, body) = served(Some(pooled as f32 * 1.01));
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    let taken = report(&body)["check"]["pooled_deviation"].as_f64().unwrap();
    assert!(
        (taken - pooled).abs() <= 1e-6 * pooled,
        "{taken} vs {pooled}"
    );
    assert!(max_diff(&embedding(&body), &exact) > MAX_ABS_DIFF);
    assert_eq!(
        metric(&server.metrics(), "attncache_blend_gate_refused_total"),
        0.0
    );
    drop(server);
    // a band with no bound takes no near hit at all, and does not even look for one: no
    // candidate is loaded, no check layer is reported; an identical input is still a hit
    let (server, exact, body) = served(None);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    assert!(report(&body)["check"].is_null(), "{body}");
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_candidates_total"), 0.0, "{m}");
    assert_eq!(metric(&m, "attncache_blend_gate_refused_total"), 0.0, "{m}");
    assert_eq!(outcomes(&post(&server, &a, true)), ["hit"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_gate_file_is_refused_at_start() {
    let model = TinyModel::new("blend-bad-gate");
    let dir = std::env::temp_dir().join(format!("attncache-bad-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let start = |path: &std::path::Path| {
        let path = path.to_string_lossy().to_string();
        std::process::Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .args(Server::args(
                &model,
                &["--reuse", "blend", "--blend-gate", &path],
            ))
            .output()
            .expect("run attncache-server")
    };
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"floor\": 0.99}").unwrap();
    let missing = dir.join("missing.json");
    let unsorted = gate_file(&dir.join("unsorted"), Some(0.1));
    let text = std::fs::read_to_string(&unsorted)
        .unwrap()
        .replace("\"min_tokens\":0", "\"min_tokens\":5");
    std::fs::write(&unsorted, text).unwrap();
    for (path, says) in [
        (&junk, "blend_gate"),
        (&missing, "reading the blend fidelity gate"),
        (&unsorted, "blend_gate.bands"),
    ] {
        let out = start(path);
        assert!(!out.status.success(), "{} was accepted", path.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{}: {stderr}", path.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

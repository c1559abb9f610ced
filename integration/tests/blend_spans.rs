//! Blend reuse aligned by content across stored inputs (the token-run index): through the
//! real server and the tiny model.
//!
//! - an input made of the tail of one stored input and the head of another, every position
//!   recomputed, equals flag off (within 1e-5);
//! - 40 tokens inserted into a stored input (far past the length slack) are found and the
//!   rest reused, only the inserted positions recomputed;
//! - the fidelity gate decides on a hit aligned across two stored inputs as on any other: over
//!   its bound it is refused and the answer is exact, under it the hit is taken;
//! - the index is rebuilt from the cold tier at start; a stored input it still names but the
//!   store lost (its file removed) is a miss with the exact answer, not an error.

use crate::common;

use super::blend::{
    blend_server, cosine, embedding, gate_file, max_diff, post, report, wait_for_files, walk,
    BY_SHARE_30, MAX_ABS_DIFF,
};
use common::{metric, outcomes, TinyModel};

/// `n` token ids of the tiny vocabulary from `seed` (ids 4..126, no run of 8 repeated).
fn words(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            4 + ((x >> 33) % 122) as u32
        })
        .collect()
}

#[test]
fn the_tail_of_one_stored_input_and_the_head_of_another_recomputed_everywhere_is_exact() {
    let model = TinyModel::new("blend-spans-two");
    let server = blend_server(
        &model,
        &["--blend-max-share", "1", "--blend-min-share", "1"],
    );
    // lengths 60 and 75: beyond the length slack of each other, so both are recorded
    let (a, b) = (words(1, 60), words(2, 75));
    for ids in [&a, &b] {
        assert_eq!(outcomes(&post(&server, ids, true)), ["miss"]);
    }
    let joined: Vec<u32> = a[25..].iter().chain(&b[..30]).copied().collect();
    let exact = embedding(&post(&server, &joined, false));
    let body = post(&server, &joined, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    let r = report(&body);
    assert_eq!(r["differing_tokens"], 0, "every position is covered: {r}");
    assert_eq!(r["stored_inputs"], 2, "{r}");
    assert_eq!(r["recomputed_tokens"], joined.len() as u64, "{r}");
    let diff = max_diff(&embedding(&body), &exact);
    eprintln!("two stored inputs, every position recomputed: max |diff| {diff:.2e}");
    assert!(diff <= MAX_ABS_DIFF, "max |diff| {diff} from flag off");
}

#[test]
fn an_insertion_of_40_tokens_is_found_and_the_rest_reused() {
    let model = TinyModel::new("blend-spans-insert");
    // a deviation bound no state reaches: S is the inserted positions only
    let server = blend_server(
        &model,
        &[
            "--blend-max-deviation",
            "1000",
            "--blend-max-share",
            "0.5",
            "--blend-min-share",
            "0",
            "--blend-dilution",
            "0",
        ],
    );
    let a = words(3, 80);
    assert_eq!(outcomes(&post(&server, &a, true)), ["miss"]);
    let inserted: Vec<u32> = a[..40]
        .iter()
        .chain(&words(4, 40))
        .chain(&a[40..])
        .copied()
        .collect();
    let exact = embedding(&post(&server, &inserted, false));
    let body = post(&server, &inserted, true);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    let r = report(&body);
    assert_eq!(r["differing_tokens"], 40, "{r}");
    assert_eq!(r["stored_inputs"], 1, "{r}");
    assert_eq!(r["recomputed_tokens"], 40, "{r}");
    let cos = cosine(&embedding(&body), &exact);
    eprintln!("40 tokens inserted, 80 reused: cosine to exact {cos:.5}");
    assert!(cos.is_finite() && cos > 0.0, "{cos}");
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_blend_hits_total"), 1.0, "{m}");
}

#[test]
fn a_stored_input_the_store_lost_is_a_miss_not_an_error() {
    let model = TinyModel::new("blend-spans-lost");
    let dir = std::env::temp_dir().join(format!("attncache-blend-spans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_string_lossy().to_string();
    let args = [
        "--cache-dir",
        dir_s.as_str(),
        "--blend-max-share",
        "1",
        "--blend-min-share",
        "1",
    ];
    let (a, c) = (words(5, 70), words(7, 90));
    {
        let server = blend_server(&model, &args);
        for ids in [&a, &c] {
            assert_eq!(outcomes(&post(&server, ids, true)), ["miss"]);
        }
        wait_for_files(&dir, 2);
    }
    // restarted: the index is rebuilt from the cold tier; `a` shifted by 10 tokens is found
    // (and read into RAM), then every file is removed: `c` is named by the index but lost
    let server = blend_server(&model, &args);
    let shift = |ids: &[u32], seed| -> Vec<u32> {
        words(seed, 20)
            .into_iter()
            .chain(ids[10..].iter().copied())
            .collect()
    };
    assert_eq!(outcomes(&post(&server, &shift(&a, 6), true)), ["near_hit"]);
    for f in walk(&dir) {
        std::fs::remove_file(f).expect("remove the entry");
    }
    let shifted = shift(&c, 8);
    let exact = embedding(&post(&server, &shifted, false));
    let body = post(&server, &shifted, true);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    // recorded now: the same input again is an exact hit
    assert_eq!(outcomes(&post(&server, &shifted, true)), ["hit"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_fidelity_gate_refuses_a_hit_aligned_across_stored_inputs_over_its_bound() {
    let model = TinyModel::new("blend-spans-gate");
    let dir = std::env::temp_dir().join(format!("attncache-spans-gate-{}", std::process::id()));
    let (a, b) = (words(11, 60), words(12, 75));
    let joined: Vec<u32> = a[25..].iter().chain(&b[..30]).copied().collect();
    let served = |max_signal: f32| {
        let gate = gate_file(&dir, Some(max_signal));
        let gate = gate.to_string_lossy().to_string();
        let mut args = vec!["--blend-gate", &gate];
        args.extend_from_slice(&BY_SHARE_30);
        let server = blend_server(&model, &args);
        for ids in [&a, &b] {
            assert_eq!(outcomes(&post(&server, ids, true)), ["miss"]);
        }
        let exact = embedding(&post(&server, &joined, false));
        (exact, post(&server, &joined, true))
    };
    let (exact, body) = served(0.0);
    assert_eq!(outcomes(&body), ["miss"], "{body}");
    assert!(max_diff(&embedding(&body), &exact) <= MAX_ABS_DIFF);
    let pooled = report(&body)["check"]["pooled_deviation"]
        .as_f64()
        .expect("the refused candidate's signal");
    let (_, body) = served(pooled as f32 * 1.01);
    assert_eq!(outcomes(&body), ["near_hit"], "{body}");
    assert_eq!(report(&body)["stored_inputs"], 2, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

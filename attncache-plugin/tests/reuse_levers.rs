//! The levers of a near hit through the hook, driven with the calls mistral.rs makes:
//! whole-map reuse, partial reuse (some layers exact), selective recompute (the rows of
//! differing tokens exact), and the predicted-error gate deciding whether to reuse at all.

use std::sync::Arc;

use attncache_plugin::kernels::exact_attention::{
    apply_probabilities, attention, probabilities, AttentionParams,
};
use attncache_plugin::{
    AttnCache, AttnCacheHook, CacheConfig, Decision, ErrorGate, ExactAttention, GatePoint, Outcome,
    ReusePolicy,
};
use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::{AttentionCall, AttentionHook, HookRow, KnownMapsCall, SdpaParams};

const LAYERS: usize = 3;
const HEADS: usize = 2;
const KV: usize = 1;
const D: usize = 8;
const L: usize = 8;
const HIDDEN: usize = 16;

fn params() -> SdpaParams {
    SdpaParams {
        n_kv_groups: HEADS / KV,
        softcap: None,
        softmax_scale: 0.4,
        sliding_window: None,
        sinks: None,
    }
}

/// Deterministic q, k, v of one input for one layer: `[1, heads|kv, L, D]`.
fn qkv(input: u32, layer: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let gen = |n: usize, salt: u32, shape: (usize, usize, usize, usize)| {
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.613 + salt as f32 * 1.91 + layer as f32 * 2.3).sin()) * 1.7)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    };
    Ok((
        gen(HEADS * L * D, input, (1, HEADS, L, D))?,
        gen(KV * L * D, input + 1000, (1, KV, L, D))?,
        gen(KV * L * D, input + 2000, (1, KV, L, D))?,
    ))
}

fn tokens_a() -> Vec<u32> {
    (0..L as u32).map(|t| 100 + t).collect()
}

/// Input A with position 2 changed.
fn tokens_b() -> Vec<u32> {
    let mut t = tokens_a();
    t[2] = 999;
    t
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes")
}

/// One forward of one input through the hook (known-maps offer, then attention), as the
/// patched EmbeddingGemma does; returns per layer the output and whether q/k were skipped.
fn forward(
    hook: &AttnCacheHook,
    request: usize,
    tokens: Vec<u32>,
    input: u32,
) -> Result<Vec<(Tensor, bool)>> {
    let p = params();
    let rows = [HookRow {
        seq_id: request,
        request_id: request,
        tokens,
        is_prompt: true,
    }];
    // the same layer-0 input for A and B: feature distance 0, only the tokens differ
    let xs = Tensor::ones((1, L, HIDDEN), DType::F32, &Device::Cpu)?;
    let mut out = Vec::new();
    // one batch, as mistral.rs runs it: the hook's per-batch state starts empty
    let _batch = mistralrs_core::enter_batch(Vec::new);
    for layer in 0..LAYERS {
        let (q, k, v) = qkv(input, layer)?;
        let v_fn = || Ok(v.clone());
        let offer = KnownMapsCall {
            xs: &xs,
            v: &v_fn,
            params: &p,
            layer_idx: layer,
            rows: &rows,
            k: None,
            q_from: None,
        };
        if let Some(o) = hook.known_maps(&offer)? {
            out.push((o, true));
            continue;
        }
        let call = AttentionCall {
            q: &q,
            k: &k,
            v: &v,
            mask: None,
            params: &p,
            layer_idx: layer,
            rows: &rows,
        };
        out.push((hook.attention(&call)?.expect("prefill is handled"), false));
    }
    Ok(out)
}

/// [`forward`] for a request registered with a ticket, and the decision its lookup took.
fn forward_decided(
    hook: &AttnCacheHook,
    request: usize,
    tokens: Vec<u32>,
    input: u32,
) -> Result<(Vec<(Tensor, bool)>, Decision)> {
    let cache = hook.cache().expect("a cache").clone();
    let ticket = cache.ticket(request, None, None).expect("a ticket");
    let out = forward(hook, request, tokens, input)?;
    Ok((out, ticket.take_decision().expect("decided")))
}

/// A hook whose cache holds input A's maps, with `policy` and an accept-everything gate.
fn hook_with_a(policy: ReusePolicy) -> AttnCacheHook {
    let cfg = CacheConfig {
        enabled_by_default: true,
        reuse: policy,
        error_gate: Some(ErrorGate::accept_all("test")),
        ..CacheConfig::default()
    };
    let cache = Arc::new(AttnCache::open(cfg, 7).expect("opens"));
    let hook = AttnCacheHook::with_cache(ExactAttention::Fast, cache, LAYERS);
    forward(&hook, 1, tokens_a(), 1).expect("records A");
    assert_eq!(hook.cache().map(|c| c.counts().recorded), Some(1));
    hook
}

/// B's exact output and B's output with A's maps, per layer.
fn references(layer: usize) -> Result<(Tensor, Tensor)> {
    let p = AttentionParams::from_sdpa(&params());
    let (qa, ka, _) = qkv(1, layer)?;
    let (qb, kb, vb) = qkv(2, layer)?;
    let exact = attention(&qb, &kb, &vb, None, &p)?;
    let with_a = apply_probabilities(&probabilities(&qa, &ka, None, &p)?, &vb)?;
    Ok((exact, with_a))
}

#[test]
fn a_near_hit_reuses_every_layer_and_skips_q_and_k() -> Result<()> {
    let hook = hook_with_a(ReusePolicy::default());
    let (out, d) = forward_decided(&hook, 2, tokens_b(), 2)?;
    assert_eq!(d.outcome, Outcome::NearHit);
    assert_eq!(d.differing, Some(1));
    for (layer, (got, skipped)) in out.iter().enumerate() {
        let (exact, with_a) = references(layer)?;
        assert!(*skipped, "layer {layer}: whole-map reuse needs no q/k");
        assert!(
            max_diff(got, &with_a) <= 2e-3,
            "layer {layer} uses A's maps"
        );
        assert!(
            max_diff(got, &exact) > 1e-2,
            "the test cannot tell maps apart"
        );
    }
    Ok(())
}

#[test]
fn partial_reuse_computes_the_other_layers_exactly() -> Result<()> {
    let hook = hook_with_a(ReusePolicy {
        layers: vec![1],
        ..ReusePolicy::default()
    });
    let out = forward(&hook, 2, tokens_b(), 2)?;
    for (layer, (got, skipped)) in out.iter().enumerate() {
        let (exact, with_a) = references(layer)?;
        if layer == 1 {
            assert!(*skipped && max_diff(got, &with_a) <= 2e-3, "layer 1 reuses");
        } else {
            assert!(!*skipped, "layer {layer} needs q/k");
            assert!(max_diff(got, &exact) <= 1e-5, "layer {layer} is exact");
        }
    }
    Ok(())
}

#[test]
fn per_head_reuse_computes_the_other_heads_exactly() -> Result<()> {
    // layer 1 reuses head 0 only, layer 2 both heads, layer 0 none
    let hook = hook_with_a(ReusePolicy {
        heads: vec![[1, 0], [2, 0], [2, 1]],
        ..ReusePolicy::default()
    });
    let out = forward(&hook, 2, tokens_b(), 2)?;
    let head = |t: &Tensor, h: usize| t.narrow(1, h, 1);
    for (layer, (got, skipped)) in out.iter().enumerate() {
        let (exact, with_a) = references(layer)?;
        match layer {
            0 => {
                assert!(!*skipped);
                assert!(max_diff(got, &exact) <= 1e-5, "layer 0 is exact");
            }
            1 => {
                assert!(!*skipped, "a layer with an exact head needs q and k");
                assert!(max_diff(&head(got, 0)?, &head(&with_a, 0)?) <= 2e-3);
                assert!(max_diff(&head(got, 1)?, &head(&exact, 1)?) <= 1e-5);
                assert!(max_diff(&head(got, 0)?, &head(&exact, 0)?) > 1e-2);
            }
            _ => {
                assert!(*skipped, "every head reused: no q/k");
                assert!(max_diff(got, &with_a) <= 2e-3);
            }
        }
    }
    assert_eq!(
        ReusePolicy {
            heads: vec![[1, 0]],
            length_slack: 2,
            ..ReusePolicy::default()
        }
        .describe(),
        "heads=1+slack=2"
    );
    Ok(())
}

#[test]
fn selective_recompute_makes_the_differing_rows_exact() -> Result<()> {
    let hook = hook_with_a(ReusePolicy {
        recompute_differing: true,
        ..ReusePolicy::default()
    });
    let (out, d) = forward_decided(&hook, 2, tokens_b(), 2)?;
    assert_eq!((d.outcome, d.recomputed_rows), (Outcome::NearHit, 1));
    for (layer, (got, skipped)) in out.iter().enumerate() {
        let (exact, with_a) = references(layer)?;
        assert!(!*skipped, "recomputing rows needs q and k");
        // [1, heads, L, d]: row 2 (the differing token) exact, the others A's maps
        let row = |t: &Tensor, i: usize| t.narrow(2, i, 1);
        assert!(max_diff(&row(got, 2)?, &row(&exact, 2)?) <= 1e-5);
        for i in (0..L).filter(|i| *i != 2) {
            assert!(
                max_diff(&row(got, i)?, &row(&with_a, i)?) <= 2e-3,
                "row {i}"
            );
        }
    }
    // a budget of 2 recomputes the neighbours 1 and 3 too
    let hook = hook_with_a(ReusePolicy {
        recompute_differing: true,
        recompute_budget: 2,
        ..ReusePolicy::default()
    });
    let out = forward(&hook, 2, tokens_b(), 2)?;
    let (exact, _) = references(0)?;
    for i in 1..=3 {
        let row = |t: &Tensor| t.narrow(2, i, 1);
        assert!(max_diff(&row(&out[0].0)?, &row(&exact)?) <= 1e-5, "row {i}");
    }
    Ok(())
}

#[test]
fn the_gate_refuses_a_neighbour_whose_predicted_error_is_too_large() -> Result<()> {
    // a gate fitted on pairs whose error grows with the differing share
    let points: Vec<GatePoint> = (1..=40)
        .map(|i| {
            let differing = 1 + i % 8;
            GatePoint {
                distance: 0.01 * i as f32,
                differing,
                tokens: L,
                loss: 0.002 * differing as f64 * (1.0 + 0.01 * i as f64),
            }
        })
        .collect();
    let gate = ErrorGate::fit(&points, 1e-5, 0.9, "all").expect("fits");
    let hook = hook_with_a(ReusePolicy::default());
    let cache = hook.cache().expect("cache").clone();
    cache.set_error_gate(Some(gate.clone())).expect("valid");
    let (out, d) = forward_decided(&hook, 2, tokens_b(), 2)?;
    assert_eq!(
        d.outcome,
        Outcome::Miss,
        "predicted {:?}",
        gate.predict(0.0, 1, L)
    );
    let (exact, _) = references(0)?;
    assert!(max_diff(&out[0].0, &exact) <= 1e-5);
    // a looser target accepts the same neighbour (B itself is stored now: use a third input)
    cache
        .set_error_gate(Some(gate.with_max_loss(0.5)))
        .expect("valid");
    let mut c = tokens_a();
    c[5] = 555;
    let (_, d) = forward_decided(&hook, 3, c, 3)?;
    assert_eq!(d.outcome, Outcome::NearHit);
    assert!(d.predicted_loss.is_some_and(|l| l <= 0.5));
    Ok(())
}

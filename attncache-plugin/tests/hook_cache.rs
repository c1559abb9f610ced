//! The hook with a cache, driven directly with the calls mistral.rs makes (layer by layer,
//! with the batch's rows): misses record, identical inputs hit, hit and miss rows in one
//! batch each get their own right result, flag-off rows stay exact, all-hit batches skip q/k.

use std::sync::Arc;

use attncache_plugin::kernels::exact_attention::{attention, AttentionParams};
use attncache_plugin::{AttnCache, AttnCacheHook, CacheConfig, ExactAttention};
use candle_core::{Device, Result, Tensor};
use mistralrs_core::{AttentionCall, AttentionHook, HookRow, KnownMapsCall, SdpaParams};

const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV: usize = 2;
const D: usize = 8;
const L: usize = 6;

fn params() -> SdpaParams {
    SdpaParams {
        n_kv_groups: HEADS / KV,
        softcap: None,
        softmax_scale: 0.35,
        sliding_window: None,
        sinks: None,
    }
}

/// Deterministic q, k, v of one input for one layer: `[1, heads|kv, L, D]`.
fn qkv(input: u32, layer: usize, v_salt: u32) -> Result<(Tensor, Tensor, Tensor)> {
    let gen = |n: usize, salt: u32, shape: (usize, usize, usize, usize)| {
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.731 + salt as f32 * 1.37 + layer as f32 * 2.1).sin()) * 1.5)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    };
    Ok((
        gen(HEADS * L * D, input, (1, HEADS, L, D))?,
        gen(KV * L * D, input + 1000, (1, KV, L, D))?,
        gen(KV * L * D, input + 2000 + v_salt, (1, KV, L, D))?,
    ))
}

fn row(seq_id: usize, request_id: usize, input: u32) -> HookRow {
    HookRow {
        seq_id,
        request_id,
        tokens: (0..L as u32).map(|t| t * 10 + input).collect(),
        is_prompt: true,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs one forward of `inputs` (one row each) through the hook's `attention` calls and
/// returns, per layer, the hook's output and the exact output.
fn forward(
    hook: &AttnCacheHook,
    rows: &[HookRow],
    inputs: &[u32],
    v_salt: u32,
) -> Result<Vec<(Tensor, Tensor)>> {
    // one batch, as mistral.rs runs it: the hook's per-batch state starts empty
    let _batch = mistralrs_core::enter_batch(Vec::new);
    let p = params();
    let mut out = Vec::new();
    for layer in 0..LAYERS {
        let parts: Vec<_> = inputs
            .iter()
            .map(|i| qkv(*i, layer, v_salt))
            .collect::<Result<_>>()?;
        let cat = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let (q, k, v) = (cat(|t| &t.0)?, cat(|t| &t.1)?, cat(|t| &t.2)?);
        let call = AttentionCall {
            q: &q,
            k: &k,
            v: &v,
            mask: None,
            params: &p,
            layer_idx: layer,
            rows,
        };
        let got = hook
            .attention(&call)?
            .expect("prefill is handled by the hook");
        let exact = attention(&q, &k, &v, None, &AttentionParams::from_sdpa(&p))?;
        out.push((got, exact));
    }
    Ok(out)
}

fn hook(enabled: bool) -> AttnCacheHook {
    let cfg = CacheConfig {
        enabled_by_default: enabled,
        ..CacheConfig::default()
    };
    let cache = Arc::new(AttnCache::open(cfg, 42).unwrap());
    AttnCacheHook::with_cache(ExactAttention::Fast, cache, LAYERS)
}

#[test]
fn misses_record_and_identical_inputs_hit() -> Result<()> {
    let hook = hook(true);
    // forward 1: two new inputs, both recorded, outputs exact
    for (got, exact) in forward(&hook, &[row(1, 1, 1), row(2, 2, 2)], &[1, 2], 0)? {
        assert!(max_diff(&got, &exact) <= 1e-5);
    }
    let cache = hook.cache().unwrap();
    assert_eq!(cache.counts().recorded, 2);
    assert_eq!(cache.counts().hits, 0);

    // forward 2: input 1 again (a hit, with different v: maps are reused, v is not) beside
    // a new input 3 (a miss) in the same batch; each row must be right.
    let out = forward(&hook, &[row(3, 3, 1), row(4, 4, 3)], &[1, 3], 7)?;
    for (got, exact) in &out {
        let hit_row = max_diff(&got.narrow(0, 0, 1)?, &exact.narrow(0, 0, 1)?);
        let miss_row = max_diff(&got.narrow(0, 1, 1)?, &exact.narrow(0, 1, 1)?);
        assert!(hit_row <= 2e-3, "hit row off by {hit_row} (f16 maps)");
        assert!(miss_row <= 1e-5, "miss row off by {miss_row}");
    }
    let c = cache.counts();
    assert_eq!((c.hits, c.recorded), (1, 3));
    assert_eq!(hook.stats().cached_calls, 4);
    Ok(())
}

#[test]
fn a_hit_uses_the_stored_maps_not_fresh_ones() -> Result<()> {
    // Same tokens, different q/k the second time: a hit must reproduce the *first* maps,
    // which proves the stored probabilities were used.
    let hook = hook(true);
    forward(&hook, &[row(1, 1, 5)], &[5], 0)?;
    let p = params();
    let (q_old, k_old, v) = qkv(5, 0, 0)?;
    // sharper maps that prefer the opposite keys
    let (q_new, k_new) = ((&q_old * -4.0)?, k_old.clone());
    let call = AttentionCall {
        q: &q_new,
        k: &k_new,
        v: &v,
        mask: None,
        params: &p,
        layer_idx: 0,
        rows: &[row(2, 2, 5)],
    };
    let got = hook.attention(&call)?.expect("handled");
    let with_old_maps = attention(&q_old, &k_old, &v, None, &AttentionParams::from_sdpa(&p))?;
    let with_new_maps = attention(&q_new, &k_new, &v, None, &AttentionParams::from_sdpa(&p))?;
    assert!(max_diff(&got, &with_old_maps) <= 2e-3);
    assert!(
        max_diff(&got, &with_new_maps) > 1e-2,
        "the test inputs do not tell the maps apart"
    );
    Ok(())
}

#[test]
fn flag_off_rows_stay_exact_and_are_not_recorded() -> Result<()> {
    let hook = hook(false); // default off
    for (got, exact) in forward(&hook, &[row(1, 1, 1)], &[1], 0)? {
        assert_eq!(
            max_diff(&got, &exact),
            0.0,
            "flag-off output must be the exact path's"
        );
    }
    let cache = hook.cache().unwrap();
    assert_eq!(cache.counts().lookups, 0);
    // the same request id turned on explicitly records; another stays off
    let ticket = cache.ticket(7, Some(true), None).unwrap();
    forward(&hook, &[row(2, 7, 1), row(3, 8, 2)], &[1, 2], 0)?;
    drop(ticket);
    assert_eq!(cache.counts().recorded, 1);
    assert_eq!(cache.counts().lookups, 1);
    Ok(())
}

#[test]
fn all_hit_batches_skip_q_and_k() -> Result<()> {
    let hook = hook(true);
    forward(&hook, &[row(1, 1, 1), row(2, 2, 2)], &[1, 2], 0)?;
    let p = params();
    let rows = [row(3, 3, 1), row(4, 4, 2)];
    let batch = mistralrs_core::enter_batch(Vec::new);
    for layer in 0..LAYERS {
        let parts = [qkv(1, layer, 0)?, qkv(2, layer, 0)?];
        let v = Tensor::cat(&[&parts[0].2, &parts[1].2], 0)?;
        let xs = Tensor::zeros((2, L, 16), candle_core::DType::F32, &Device::Cpu)?;
        let v_fn = || Ok(v.clone());
        let call = KnownMapsCall {
            xs: &xs,
            v: &v_fn,
            params: &p,
            layer_idx: layer,
            rows: &rows,
            k: None,
            q_from: None,
        };
        let got = hook
            .known_maps(&call)?
            .expect("every row hits: q/k are skipped");
        let q = Tensor::cat(&[&parts[0].0, &parts[1].0], 0)?;
        let k = Tensor::cat(&[&parts[0].1, &parts[1].1], 0)?;
        let exact = attention(&q, &k, &v, None, &AttentionParams::from_sdpa(&p))?;
        assert!(max_diff(&got, &exact) <= 2e-3);
    }
    assert_eq!(hook.stats().qk_skipped_calls, LAYERS as u64);
    drop(batch);
    // a batch with a miss does not skip q/k
    let _batch = mistralrs_core::enter_batch(Vec::new);
    let rows = [row(5, 5, 1), row(6, 6, 9)];
    let xs = Tensor::zeros((2, L, 16), candle_core::DType::F32, &Device::Cpu)?;
    let v = Tensor::zeros((2, KV, L, D), candle_core::DType::F32, &Device::Cpu)?;
    let v_fn = || Ok(v.clone());
    let call = KnownMapsCall {
        xs: &xs,
        v: &v_fn,
        params: &p,
        layer_idx: 0,
        rows: &rows,
        k: None,
        q_from: None,
    };
    assert!(hook.known_maps(&call)?.is_none());
    Ok(())
}

#[test]
fn decode_steps_and_mismatched_lengths_are_left_alone() -> Result<()> {
    let hook = hook(true);
    let p = params();
    let (q, k, v) = qkv(1, 0, 0)?;
    let mut decode = row(1, 1, 1);
    decode.is_prompt = false;
    let call = AttentionCall {
        q: &q,
        k: &k,
        v: &v,
        mask: None,
        params: &p,
        layer_idx: 0,
        rows: &[decode],
    };
    assert!(
        hook.attention(&call)?.is_none(),
        "decode goes to mistral.rs"
    );
    // tokens of another length than the tensor's (padding): computed exactly, not cached
    let mut padded = row(2, 2, 1);
    padded.tokens.pop();
    let call = AttentionCall {
        q: &q,
        k: &k,
        v: &v,
        mask: None,
        params: &p,
        layer_idx: 0,
        rows: &[padded],
    };
    hook.attention(&call)?.expect("exact path");
    assert_eq!(hook.cache().unwrap().counts().lookups, 0);
    Ok(())
}

#[test]
fn per_row_masks_stay_with_their_rows() -> Result<()> {
    // A mask with a batch dimension: row 0 causal, row 1 bidirectional. Recording both rows
    // computes them one by one, each with its own mask.
    let hook = hook(true);
    let p = params();
    let causal: Vec<f32> = (0..L * L)
        .map(|x| {
            if x % L <= x / L {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::cat(
        &[
            Tensor::from_vec(causal, (1, L, L), &Device::Cpu)?,
            Tensor::zeros((1, L, L), candle_core::DType::F32, &Device::Cpu)?,
        ],
        0,
    )?;
    let parts = [qkv(1, 0, 0)?, qkv(2, 0, 0)?];
    let cat = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
        Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
    };
    let (q, k, v) = (cat(|t| &t.0)?, cat(|t| &t.1)?, cat(|t| &t.2)?);
    let rows = [row(1, 1, 1), row(2, 2, 2)];
    let call = AttentionCall {
        q: &q,
        k: &k,
        v: &v,
        mask: Some(&mask),
        params: &p,
        layer_idx: 0,
        rows: &rows,
    };
    let got = hook.attention(&call)?.expect("handled");
    for (i, part) in parts.iter().enumerate() {
        let m = mask.narrow(0, i, 1)?.unsqueeze(1)?;
        let want = attention(
            &part.0,
            &part.1,
            &part.2,
            Some(&m),
            &AttentionParams::from_sdpa(&p),
        )?;
        let diff = max_diff(&got.narrow(0, i, 1)?, &want);
        assert!(diff <= 1e-5, "row {i} off by {diff}");
    }
    Ok(())
}

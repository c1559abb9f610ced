//! Whether a blend hit pays: its predicted speed-up over the exact forward, from the rows
//! each layer runs on ([`predicted_gain`]). A hit predicted under
//! [`super::BlendPolicy::min_gain`] is refused at the check layer and computed exactly, so
//! short inputs, where a layer costs about the same on a few rows as on all of them, do not
//! trade fidelity for a few percent.
//!
//! The cost model: a layer on `x` rows costs `fixed_tokens + x`, in units of one token's
//! share of a layer — `fixed_tokens` is what a layer costs however few rows it runs on
//! (reading the weights, and the request's own overhead spread over the layers), measured
//! as the intercept over the slope of the exact forward's time against input length. A
//! blend hit runs the layers up to the check layer on every position and the later ones on
//! S (an escalated hit: S up to the resume layer, every position after it; an identical
//! input with S empty: none after the check layer). Attention's quadratic term is left out,
//! which underestimates what long inputs save: the prediction errs towards refusing.
//!
//! Against `make blend-eval`'s held-out hits (commit d3ef4ce, EmbeddingGemma, 2 cores) with
//! `fixed_tokens` 31: spam pairs at 256 tokens predicted 1.76–2.04x (fast rule) and 1.58x
//! (escalated) against 1.42–2.21x measured; 1024-token documents 5.9–8.2x against
//! 6.1–9.6x; 2048 15.8–15.9x against 13.1–17.5x; identical inputs 24x against 16–24x.

/// The predicted speed-up of a blend hit over the exact forward of an input of `len`
/// tokens, with `recomputed` positions (S) run after `check_layer` of `n_layers`, every
/// position again after `resume_after` when the hit is escalated; `fixed_tokens` is a
/// layer's cost that does not shrink with its rows, in tokens.
pub fn predicted_gain(
    len: usize,
    recomputed: usize,
    n_layers: usize,
    check_layer: usize,
    resume_after: Option<usize>,
    fixed_tokens: f32,
) -> f64 {
    let (len, s, fixed) = (len as f64, recomputed as f64, f64::from(fixed_tokens));
    // a layer's cost on the rows it runs on; with nothing to recompute (and no escalation)
    // the layers after the check layer do not run at all: the stored output is the answer
    let cost = |layer: usize| match resume_after {
        _ if layer <= check_layer => fixed + len,
        Some(r) if layer > r => fixed + len,
        None if recomputed == 0 => 0.0,
        _ => fixed + s,
    };
    let exact = n_layers as f64 * (fixed + len);
    let blend: f64 = (0..n_layers).map(cost).sum();
    if blend <= 0.0 {
        return f64::INFINITY;
    }
    exact / blend
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gain_follows_the_rows_each_layer_runs_on() {
        // no fixed cost: 24 layers, layer 0 on 100 rows, 23 on 10 → 2400 / 330
        let g = predicted_gain(100, 10, 24, 0, None, 0.0);
        assert!((g - 2400.0 / 330.0).abs() < 1e-12, "{g}");
        // every position recomputed: no gain, whatever the fixed cost
        assert_eq!(predicted_gain(100, 100, 24, 0, None, 64.0), 1.0);
        // a fixed cost shrinks the gain, most for short inputs
        let short = predicted_gain(25, 10, 24, 0, None, 64.0);
        let long = predicted_gain(1000, 400, 24, 0, None, 64.0);
        assert!(short < 1.2 && long > 2.0, "{short} {long}");
        // escalated after layer 11: layers 1..=11 on S, 12..24 on every position
        let escalated = predicted_gain(100, 10, 24, 0, Some(11), 0.0);
        assert!((escalated - 2400.0 / (100.0 + 11.0 * 10.0 + 12.0 * 100.0)).abs() < 1e-12);
        // nothing recomputed after layer 0 of an identical input: the later layers do not
        // run, fixed cost or not
        assert_eq!(predicted_gain(100, 0, 24, 0, None, 0.0), 24.0);
        assert_eq!(predicted_gain(100, 0, 24, 0, None, 64.0), 24.0);
        assert!(predicted_gain(0, 0, 24, 0, None, 0.0).is_infinite());
    }
}

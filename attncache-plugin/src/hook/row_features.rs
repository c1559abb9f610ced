//! The similarity features of a batch's rows, computed from layer 0's input only when some
//! row uses the cache (flag-off batches pay nothing); shared by the map and blend forwards.

use candle_core::Tensor;
use mistralrs_core::HookRow;

use crate::cache::AttnCache;

/// One feature per row of `xs` (layer 0's normalised input, `[b, L, hidden]`), or `None`
/// when no row uses the cache or the computation failed (logged: the batch then makes exact
/// lookups only).
pub(crate) fn features_for(
    cache: &AttnCache,
    rows: &[HookRow],
    xs: &Tensor,
) -> Option<Vec<Vec<f32>>> {
    if !rows.iter().any(|r| cache.enabled_for(r.request_id)) {
        return None;
    }
    cache
        .features()
        .compute(xs)
        .map_err(|e| tracing::warn!("cannot compute features, exact lookups only: {e}"))
        .ok()
}

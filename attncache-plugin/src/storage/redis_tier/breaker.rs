//! The circuit breaker: a failed or late call marks Redis down for [`RETRY_AFTER`]; while
//! down, calls are skipped at once (misses, skipped writes), so an outage costs requests
//! nothing but their hits.

use std::sync::atomic::Ordering;

use super::{redacted_url, Inner, RETRY_AFTER};

impl Inner {
    pub(super) fn is_down(&self) -> bool {
        self.health.down.load(Ordering::Relaxed)
            && self.uptime_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    pub(super) fn mark_down(&self, why: &str) {
        self.health.errors.fetch_add(1, Ordering::Relaxed);
        self.down_until_ms.store(
            self.uptime_ms() + RETRY_AFTER.as_millis() as u64,
            Ordering::Relaxed,
        );
        if !self.health.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                url = %redacted_url(&self.config.url),
                "Redis unavailable, serving from this replica's hot tier only (retrying every \
                 {} s; see attncache_shared_tier_up): {why}",
                RETRY_AFTER.as_secs()
            );
        } else {
            tracing::debug!("Redis call failed: {why}");
        }
    }

    pub(super) fn mark_up(&self) {
        if self.health.down.swap(false, Ordering::Relaxed) {
            tracing::info!(url = %redacted_url(&self.config.url), "Redis reachable again");
        }
    }
}

//! The attention hook installed into mistral.rs (see `patches/`).
//!
//! With [`ExactAttention::Stock`] the hook declines every call, so mistral.rs runs its own
//! kernel and the output is bit-identical to not installing the hook. With
//! [`ExactAttention::Fast`] prefill attention runs through [`crate::exact_attention`];
//! decode steps, attention sinks and anything else this path does not cover still go to
//! mistral.rs.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::{AttentionCall, AttentionHook};

use crate::error::AttnCacheError;
use crate::exact_attention::{self, AttentionParams};

/// Which attention runs when no cached map applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExactAttention {
    /// Matrix-multiply attention (`exact_attention`), within 1e-5 of stock; ~3x faster on CPU.
    #[default]
    Fast,
    /// mistral.rs's own kernel, bit for bit.
    Stock,
}

impl ExactAttention {
    fn to_u8(self) -> u8 {
        match self {
            Self::Fast => 0,
            Self::Stock => 1,
        }
    }
    fn from_u8(v: u8) -> Self {
        if v == 1 {
            Self::Stock
        } else {
            Self::Fast
        }
    }
}

impl FromStr for ExactAttention {
    type Err = AttnCacheError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fast" => Ok(Self::Fast),
            "stock" => Ok(Self::Stock),
            other => Err(AttnCacheError::InvalidSetting {
                name: "exact-attention",
                value: other.to_string(),
                expected: "fast or stock",
            }),
        }
    }
}

impl std::fmt::Display for ExactAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fast => "fast",
            Self::Stock => "stock",
        })
    }
}

/// Counters of what the hook did, for metrics and for tests that must know the hook ran.
#[derive(Debug, Default)]
pub struct HookStats {
    fast_calls: AtomicU64,
    declined_calls: AtomicU64,
}

/// A snapshot of [`HookStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounts {
    /// Attention calls computed by the fast exact path.
    pub fast_calls: u64,
    /// Attention calls left to mistral.rs (stock mode, decode, unsupported shapes).
    pub declined_calls: u64,
}

impl HookStats {
    /// Current counts.
    pub fn snapshot(&self) -> HookCounts {
        HookCounts {
            fast_calls: self.fast_calls.load(Ordering::Relaxed),
            declined_calls: self.declined_calls.load(Ordering::Relaxed),
        }
    }
}

/// The AttnCache attention hook.
#[derive(Debug, Default)]
pub struct AttnCacheHook {
    exact: AtomicU8,
    stats: HookStats,
}

impl AttnCacheHook {
    /// A hook whose non-cached attention is `exact`.
    pub fn new(exact: ExactAttention) -> Self {
        Self {
            exact: AtomicU8::new(exact.to_u8()),
            stats: HookStats::default(),
        }
    }

    /// The attention used when no cached map applies.
    pub fn exact_attention(&self) -> ExactAttention {
        ExactAttention::from_u8(self.exact.load(Ordering::Relaxed))
    }

    /// Switches the attention used when no cached map applies (takes effect on the next call).
    pub fn set_exact_attention(&self, exact: ExactAttention) {
        self.exact.store(exact.to_u8(), Ordering::Relaxed);
    }

    /// What the hook has done so far.
    pub fn stats(&self) -> HookCounts {
        self.stats.snapshot()
    }

    fn fast_path(&self, call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        let prefill = !call.rows.is_empty() && call.rows.iter().all(|r| r.is_prompt);
        if self.exact_attention() == ExactAttention::Stock
            || !prefill
            || call.params.sinks.is_some()
        {
            return Ok(None);
        }
        // [b, heads, L_q, d] and [b, kv_heads, L_kv, d]; prefill of a whole prompt has L_q == L_kv.
        let (b, heads, lq, _) = call.q.dims4()?;
        let lk = call.k.dim(2)?;
        if lq != lk || !call.q.device().is_cpu() {
            return Ok(None);
        }
        let mask = match call.mask {
            Some(m) => match exact_attention::normalize_mask(m, b, heads, lq, lk) {
                Some(m) => Some(m),
                None => return Ok(None),
            },
            None => None,
        };
        let params = AttentionParams::from_sdpa(call.params);
        exact_attention::attention(call.q, call.k, call.v, mask.as_ref(), &params).map(Some)
    }
}

impl AttentionHook for AttnCacheHook {
    fn attention(&self, call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        let out = self.fast_path(call)?;
        let counter = if out.is_some() {
            &self.stats.fast_calls
        } else {
            &self.stats.declined_calls
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }
}

/// Installs `hook` into mistral.rs for the whole process, replacing any other hook.
pub fn install(hook: Arc<AttnCacheHook>) {
    let previous = mistralrs_core::set_attention_hook(Some(hook));
    if previous.is_some() {
        tracing::warn!("replaced an attention hook that was already installed");
    }
}

/// Removes whatever attention hook is installed; mistral.rs runs unmodified afterwards.
pub fn uninstall() {
    mistralrs_core::set_attention_hook(None);
}

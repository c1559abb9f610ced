//! A hook that panics cannot leave the patch's "inside the hook" mark set on its thread:
//! the next attention call is offered to the hook again. (Before the patch's guard, a
//! panic skipped the reset and every later call on that thread silently went to mistral.rs,
//! as if no hook were installed.) Its own test binary: it installs a hook process-wide.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use mistralrs_core::layers::Sdpa;
use mistralrs_core::{set_attention_hook, AttentionCall, AttentionHook, SdpaParams};

/// Panics on its first call, declines afterwards; counts the calls.
#[derive(Default)]
struct FailsOnce {
    calls: AtomicUsize,
}

impl AttentionHook for FailsOnce {
    fn attention(&self, _call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("the hook fails once");
        }
        Ok(None)
    }
}

#[test]
fn a_hook_that_panicked_is_asked_again() -> Result<()> {
    let hook = Arc::new(FailsOnce::default());
    set_attention_hook(Some(hook.clone()));
    let t = || Tensor::randn(0f32, 1.0, (1, 2, 4, 8), &Device::Cpu);
    let (q, k, v) = (t()?, t()?, t()?);
    let params = SdpaParams {
        n_kv_groups: 1,
        softcap: None,
        softmax_scale: 1.0 / 8f32.sqrt(),
        sliding_window: None,
        sinks: None,
    };
    let first = catch_unwind(AssertUnwindSafe(|| {
        Sdpa.run_attention(&q, &k, &v, None, None, &params)
    }));
    assert!(first.is_err(), "the hook's panic reaches the caller");
    // same thread: the hook must be asked again, and declining gives mistral.rs's output
    let second = Sdpa.run_attention(&q, &k, &v, None, None, &params)?;
    assert_eq!(
        hook.calls.load(Ordering::SeqCst),
        2,
        "after its panic the hook was never asked again on this thread"
    );
    assert_eq!(second.dims(), &[1, 2, 4, 8]);
    set_attention_hook(None);
    Ok(())
}

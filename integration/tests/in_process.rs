//! Tests that run the server inside the test process (to reach its hook and cache directly).
//! The attention hook is process-wide: every test here holds [`env_lock`] while it installs
//! one, so they never overlap.

mod common;

mod cache_pipeline;
mod hook_equivalence;
mod local_server;

/// Serialises the tests of this binary: each installs the process-wide attention hook.
pub async fn env_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

//! The plugin's tests through its public API (hook, cache, store, entries, projector): one
//! test binary, one module per topic. `hook_panics` is a binary of its own: it installs a
//! process-wide attention hook.

mod exact_vs_stock;
mod hook_cache;
mod hostile_entries;
mod projector;
mod reuse_levers;
mod scopes_and_faults;
mod store;

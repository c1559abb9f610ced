//! Logging for the eval binaries: the server's warnings (and `RUST_LOG`'s choice) on
//! stderr, beside their progress lines.

/// Installs a `tracing` subscriber writing to stderr at `RUST_LOG`'s level (default
/// `warn`); a second call does nothing.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

//! `attncache-server`: see `--help`.

use attncache_server::cli::ServeArgs;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv = match attncache_server::config_file::args_with_config(std::env::args_os().collect())
    {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let args = ServeArgs::parse_from(argv);
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    attncache_server::startup::serve(args).await
}

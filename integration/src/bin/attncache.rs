//! `attncache`: tools around the AttnCache server (see `--help`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tools around attncache-server.
#[derive(Debug, Parser)]
#[command(name = "attncache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measures the fidelity of reusing a similar input's attention maps against the
    /// feature distance, on a held-out split of your texts, and picks the similarity
    /// threshold (largest distance whose hits keep the target mean cosine). Writes JSON
    /// and an SVG plot; pass the threshold to attncache-server --similarity-threshold.
    Calibrate(attncache_server::calibrate::CalibrateArgs),
    /// Records real attention maps of unlabelled texts (and one-word variants of them) and
    /// trains the feature projector whose distances predict map distances; writes
    /// projector.safetensors + projector.json (tied to the model) into --out. Then calibrate
    /// it and serve with attncache-server --projector DIR.
    TrainProjector(attncache_server::train_projector::TrainProjectorArgs),
    /// Trains a classification head (linear layer + softmax) on the served model's
    /// embeddings of labelled texts, reports held-out accuracy (cache off), and writes
    /// head.safetensors + head.json for attncache-server --classifier DIR.
    TrainHead(attncache_server::train_head::TrainHeadArgs),
    /// Offline hot-tier sizing: replays an access trace (attncache-server --access-trace
    /// FILE) with the measured tier costs (tier-costs.json in the server's --cache-dir) and
    /// prints predicted slowdown against hot-tier size, the smallest size within
    /// --target-loss, a JSON report and an SVG plot.
    Size(attncache_server::tier_report::SizeArgs),
    /// Measures the tier costs on this machine (hot hit, cold hit, miss) for entries of the
    /// model's shape at several lengths, prints them and adds them to
    /// <cache-dir>/tier-costs.json, which attncache-server's automatic hot-tier sizing reads.
    TierCosts(attncache_server::tier_report::TierCostsArgs),
    /// Writes the tiny deterministic EmbeddingGemma-shaped test model (2 layers, hidden 64,
    /// WordLevel tokenizer) into a directory that attncache-server can load.
    TinyModel {
        /// Directory to write (created if missing; files are overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights; the same seed always writes the same model.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,hnsw_rs=warn,mistralrs_core=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::TierCosts(args) => {
            attncache_server::tier_report::run_costs(&args)?;
        }
        Command::Size(args) => {
            let r = attncache_server::tier_report::run(&args)?;
            attncache_server::tier_report::print_summary(&r, &args.out);
        }
        Command::Calibrate(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let c = runtime.block_on(attncache_server::calibrate::run(&args))?;
            attncache_server::calibrate::print_summary(&c, &args.out);
        }
        Command::TrainProjector(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let t = runtime.block_on(attncache_server::train_projector::run(&args))?;
            attncache_server::train_projector::print_summary(&t, &args.out);
        }
        Command::TrainHead(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let c = runtime.block_on(attncache_server::train_head::train_head(&args))?;
            println!(
                "labels {:?}; accuracy: train {:.4} ({} texts), held-out {:.4} ({} texts); written: {}",
                c.labels,
                c.train_accuracy,
                c.train_examples,
                c.test_accuracy,
                c.test_examples,
                args.out.display()
            );
        }
        Command::TinyModel { out, seed } => {
            attncache_server::tiny_model::write(&out, seed)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}

//! `attncache-server`: the mistral.rs OpenAI-compatible server with the AttnCache attention
//! hook installed, and the tools around it.
//!
//! - [`api`]: our routes (`/v1/embeddings` with the cache flag, `/metrics`) in front of
//!   mistral.rs's router;
//! - [`calibrate`]: measures fidelity against feature distance and picks the similarity threshold;
//! - [`classifier`]: the linear classification head `/v1/classify` serves;
//! - [`train_head`]: `attncache train-head` (embeds labelled texts, trains and saves a head);
//! - [`cli`]: the server's command-line flags; [`config_file`]: the same from a TOML file;
//! - [`local_server`]: an in-process server plus client, for the measuring tools;
//! - [`model_dir`]: checks a local model directory and picks a safe dtype;
//! - [`progress`]: progress bars that still report as log lines without a terminal;
//! - [`redis_server`]: a throw-away `redis-server` for tests and measurements of the shared tier;
//! - [`startup`]: loads the model, installs the hook, builds the HTTP router and serves it;
//! - [`texts`]: loads text sets and makes near-duplicate variants of them;
//! - [`train_projector`]: records maps and trains the feature projector;
//! - [`tiny_model`]: writes the small deterministic EmbeddingGemma-shaped model the tests use.

pub mod api;
pub mod calibrate;
pub mod classifier;
pub mod cli;
pub mod config_file;
pub mod local_server;
pub mod model_dir;
pub mod model_text;
pub mod progress;
pub mod redis_server;
pub mod startup;
pub mod texts;
pub mod tier_report;
pub mod tiny_model;
pub mod train_head;
pub mod train_projector;

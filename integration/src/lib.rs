//! `attncache-server`: the mistral.rs OpenAI-compatible server with the AttnCache attention
//! hook installed, the `attncache` tools around it, and the kit its tests stand up.
//!
//! - `server`: what `attncache-server` runs —
//!   [`cli`] (flags) and [`config_file`] (the same from TOML), [`startup`] (loads the model,
//!   installs the hook, builds the router), [`api`] (the routes, their request and response
//!   types, the queue, metrics), [`model_dir`] and [`model_text`] (the served model's files,
//!   tokenizer and prompts), [`classifier`] (the head `/v1/classify` serves);
//! - `tools`: what `attncache` runs — [`calibrate`], [`train_projector`], [`train_head`],
//!   [`tier_report`] (`attncache size`), and what they share: [`local_server`] (an
//!   in-process server plus client), [`progress`], [`texts`] (text sets, near-duplicates);
//!   [`tiny_model`] (the small deterministic EmbeddingGemma-shaped model the tests use, also
//!   `attncache tiny-model`);
//! - `testkit` (cargo feature `testkit`): `redis_server` (a throw-away `redis-server`).
//!
//! Each folder's module doc says what it may call; the modules are re-exported here, so
//! their paths are `attncache_server::cli`, `attncache_server::api`, ….

pub mod server;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tools;

pub use server::{api, classifier, cli, config_file, decoder, model_dir, model_text, startup};
#[cfg(feature = "testkit")]
pub use testkit::redis_server;
pub use tools::{
    calibrate, local_server, progress, texts, tier_report, tiny_decoder, tiny_decoder_dir,
    tiny_model, train_head, train_projector,
};

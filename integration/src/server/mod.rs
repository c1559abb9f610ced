//! The server: command-line flags and the TOML config file, start-up (model, hook,
//! router), the HTTP routes (`api/`), the served model's directory and text handling, and
//! the classification head `/v1/classify` uses; a decoder LLM (a GGUF file) is served
//! prefill-only by `decoder/`.
//!
//! May call: the plugin's public API, mistral.rs's server core. Never `tools` or `testkit`.

pub mod api;
pub mod classifier;
pub mod cli;
pub mod config_file;
pub mod decoder;
pub mod model_dir;
pub mod model_text;
pub mod startup;

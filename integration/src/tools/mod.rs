//! The `attncache` tools: calibrate, train-projector, train-head, size (the tier report),
//! tiny-model (the small deterministic EmbeddingGemma-shaped model the tests use, and the
//! tiny llama-shaped GGUF decoder of `tiny_decoder`, and a llama directory in safetensors,
//! `tiny_decoder_dir`), and what
//! they share — an in-process server with a client (`local_server`), progress
//! that still reports without a terminal, text sets and near-duplicate variants.
//!
//! May call: `server` (a tool starts the server as `attncache-server` would). Never called
//! by `server`.

pub mod calibrate;
pub mod local_server;
pub mod progress;
pub mod texts;
pub mod tier_report;
pub mod tiny_decoder;
pub mod tiny_decoder_dir;
pub mod tiny_model;
pub mod train_head;
pub mod train_projector;

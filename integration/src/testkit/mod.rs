//! What tests and measurements stand up around the server: the tiny deterministic
//! EmbeddingGemma-shaped model (also `attncache tiny-model`) and a throw-away
//! `redis-server`. Not behind a cargo feature: `attncache tiny-model` ships it, and the
//! benches' scale-out eval starts Redis with it.
//!
//! May call: nothing of this crate.

pub mod redis_server;
pub mod tiny_model;

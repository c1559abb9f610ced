//! Benchmarks and the evaluation harness of AttnCache. The criterion benches live in
//! `benches/`, the evaluation in `src/bin/eval.rs`; this library holds what they share.

pub mod layer_attention;
pub mod provenance;
pub mod report;
pub mod stats;
pub mod synthetic;
pub mod workloads;

//! Benchmarks and the evaluation harness of AttnCache. The criterion benches live in
//! `benches/`, the evaluations in `src/bin/`; this library holds what they share.

pub mod layer_attention;
pub mod logging;
pub mod provenance;
pub mod report;
pub mod stats;
pub mod synthetic;
pub mod workloads;

//! Benchmarks and the evaluation harness of AttnCache. The criterion benches live in
//! `benches/`; this library holds what they share.

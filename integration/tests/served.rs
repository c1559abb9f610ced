//! The end-to-end tests that drive `attncache-server` as a child process (the real binary on
//! a loopback port, the tiny generated model, real files, real Redis, the official Python
//! clients): one test binary, one module per topic, so the workspace links one binary
//! instead of one per file.

mod common;

mod api_e2e;
mod blend;
mod blend_spans;
mod calibrate_cli;
mod conformance;
mod crash_kill;
mod decoder;
mod disk_faults;
mod hostile_http;
mod hostile_requests;
mod hot_sizing;
mod redis_tier;
mod scale_out;
mod server_e2e;
mod serving_parity;
mod tenant_isolation;
mod train_projector_cli;

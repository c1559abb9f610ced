//! Sizing the hot tier the way Tuna sizes fast memory: the tiers' costs measured on this
//! machine for the served model's entry shape (`costs`), the miss-ratio curve from sampled
//! reuse distances and the smallest budget within a slowdown target (`sizing`), and an
//! opt-in access trace for offline sizing (`access_trace`).
//!
//! Owns: the measured-costs file and the trace file. May call: `storage` (`costs` times real
//! tier reads), `kernels` (`costs` times a hit's and a miss's arithmetic).

pub mod access_trace;
pub mod costs;
pub mod sizing;

//! Finding a stored input whose maps will be close: input features (untrained baselines or
//! the learned projector), the per-length HNSW index over them, and the error gate that
//! refuses a candidate predicted to change the output too much; the token-run index that
//! aligns an input by content with the stored inputs it shares runs with.
//!
//! Owns: the trained projector's weights, the index's graphs, the gate's calibration.
//! May call: `storage::entry` (training pairs read entries), `storage::stable_hash`
//! (fingerprint stamps), `reuse` (the gate's per-policy points).

pub mod error_gate;
pub(crate) mod features;
pub(crate) mod index;
pub mod map_distance;
pub mod projector;
pub mod span_index;

pub use error_gate::{ErrorGate, GatePoint};
pub use features::{FeatureExtractor, FeatureKind};

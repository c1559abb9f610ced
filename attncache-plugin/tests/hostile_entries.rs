//! Property tests: the entry decoder never panics on hostile bytes, and never returns maps
//! from bytes that are not exactly what the encoder wrote.

use attncache_plugin::storage::entry::{self, AttentionMaps, Entry, Payload};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

const FP: u64 = 0x5EED;

fn sample_entry() -> Entry {
    let (heads, l) = (2, 5);
    let t = Tensor::ones((heads, l, l), DType::F32, &Device::Cpu).unwrap();
    let t = (t / l as f64).unwrap().to_dtype(DType::F16).unwrap();
    Entry {
        tokens: (10..10 + l as u32).collect(),
        feature: vec![0.5, -1.0].into(),
        feature_id: 7,
        payload: Payload::Maps(AttentionMaps {
            heads,
            layers: vec![t.clone(), t],
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes: an error, never a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = entry::decode(&bytes, FP);
        let _ = entry::read_header(&bytes, FP);
    }

    /// A valid header followed by garbage, or a valid entry with any byte changed, any
    /// truncation or any extension: never decoded into maps.
    #[test]
    fn damaged_entries_are_refused(
        at in 0usize..4096,
        xor in 1u8..=255,
        cut in 0usize..4096,
        extra in proptest::collection::vec(any::<u8>(), 1..16),
    ) {
        let good = entry::encode(&sample_entry(), FP).unwrap();
        prop_assert!(entry::decode(&good, FP).is_ok());

        let mut flipped = good.clone();
        let i = at % flipped.len();
        flipped[i] ^= xor;
        prop_assert!(entry::decode(&flipped, FP).is_err(), "byte {} flipped", i);

        let cut = cut % good.len();
        prop_assert!(entry::decode(&good[..cut], FP).is_err(), "cut at {}", cut);

        let mut longer = good.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(entry::decode(&longer, FP).is_err());

        // header fields that claim absurd shapes are refused without allocating them
        let mut huge = good.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        prop_assert!(entry::decode(&huge, FP).is_err());
    }
}

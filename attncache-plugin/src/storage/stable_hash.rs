//! Hashes that are persisted, and so must give the same value in every build: the store key
//! of a token sequence (disk file names, Redis keys, the access trace) and the model
//! fingerprint (entry headers, the cold tier's directory and Redis key base, the stamp in
//! projector and head files).
//!
//! Both are XXH3-64 with seed 0 — a frozen, specified algorithm (xxHash 0.8), from the
//! `xxhash-rust` crate that redis already brings into the graph — fed explicit
//! little-endian bytes. std's `DefaultHasher`, used before, promises neither its algorithm
//! nor how `Hash` feeds it across Rust releases: a toolchain change would have orphaned
//! every stored entry and stopped replicas built with different toolchains from sharing.

use xxhash_rust::xxh3::Xxh3;

/// The store key of a token sequence: XXH3-64 of the ids as little-endian `u32`s.
pub fn token_key(tokens: &[u32]) -> u64 {
    let mut h = Xxh3::new();
    let mut buf = [0u8; 1024];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (b, t) in buf.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    h.digest()
}

/// Builds a fingerprint from fields fed in a fixed order, each as explicit little-endian
/// bytes (byte strings with their length first, so no two field lists collide).
#[derive(Default)]
pub struct Fingerprinter(Xxh3);

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter")
    }
}

impl Fingerprinter {
    /// An empty fingerprint.
    pub fn new() -> Self {
        Self(Xxh3::new())
    }

    /// Adds a byte string (its length, then its bytes).
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.u64(bytes.len() as u64);
        self.0.update(bytes);
        self
    }

    /// Adds a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// Adds a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// The fingerprint of what was added.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// How a file's stamped model fingerprint (16 hex digits) relates to the served model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Made for this model, under the stable fingerprint.
    Current,
    /// Made for this model under the fingerprint of earlier builds (std's `DefaultHasher`,
    /// as this toolchain computes it): accepted, with a log line.
    Legacy,
    /// Made for another model.
    Other,
}

/// Checks `stamped` against the model's `current` fingerprint and, when known, its `legacy`
/// one.
pub fn check_stamp(stamped: &str, current: u64, legacy: Option<u64>) -> Stamp {
    let hex = |v: u64| format!("{v:016x}");
    if stamped == hex(current) {
        Stamp::Current
    } else if legacy.is_some_and(|l| stamped == hex(l)) {
        Stamp::Legacy
    } else {
        Stamp::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values, computed with an independent XXH3 implementation (the `xxhash` 3.5.0
    /// Python package: `xxh3_64_intdigest` of the ids packed as `<I`). They must never
    /// change: every stored entry is filed under them.
    #[test]
    fn token_keys_are_pinned_xxh3_of_little_endian_ids() {
        assert_eq!(token_key(&[]), 0x2d06800538d394c2);
        assert_eq!(token_key(&[2]), 0x70f5911d66a20bc9);
        assert_eq!(token_key(&[2, 9259, 1037, 1]), 0x291e425d863c8991);
        let long: Vec<u32> = (0..1000).collect();
        assert_eq!(token_key(&long), 0x836bcd8c25b77afd);
    }

    #[test]
    fn fingerprints_are_pinned_and_field_order_matters() {
        let mut f = Fingerprinter::new();
        f.bytes(b"config.json").u64(1234).u32(0xdead_beef);
        let v = f.finish();
        // the same independent implementation: xxh3_64 of <Q 11, b"config.json", <Q 1234, <I
        assert_eq!(v, 0xf5514e9684ba4cc2, "{v:016x}");
        let mut g = Fingerprinter::new();
        g.bytes(b"config.jso")
            .bytes(b"n")
            .u64(1234)
            .u32(0xdead_beef);
        assert_ne!(g.finish(), v, "byte strings carry their length");
    }

    #[test]
    fn stamps_are_current_legacy_or_other() {
        assert_eq!(check_stamp("00000000000000ab", 0xab, None), Stamp::Current);
        assert_eq!(
            check_stamp("00000000000000cd", 0xab, Some(0xcd)),
            Stamp::Legacy
        );
        assert_eq!(check_stamp("00000000000000cd", 0xab, None), Stamp::Other);
        assert_eq!(check_stamp("ab", 0xab, Some(0xab)), Stamp::Other);
    }
}

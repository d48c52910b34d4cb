//! Seeded, machine-independent orders (sampling, splits): the same seed gives the same rows everywhere.

/// A seeded, machine-independent order: sha256(seed:index).
pub fn seeded_key(seed: u64, key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{seed}:{key}").as_bytes());
    h.finalize().into()
}

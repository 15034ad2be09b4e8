//! One key-derivation function for every derived key and seed (HKDF-SHA256),
//! with a label per purpose so no two purposes can ever share a key.

use hkdf::Hkdf;
use sha2::Sha256;

/// HKDF-SHA256 with `label` as salt and `info` as context; 32 bytes out.
pub(crate) fn derive(ikm: &[u8], label: &str, info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF's 255·32 limit, so expansion cannot fail.
    Hkdf::<Sha256>::new(Some(label.as_bytes()), ikm)
        .expand(info, &mut out)
        .expect("32-byte HKDF output is always valid");
    out
}

//! X25519 key pairs, pairwise mask seeds, and share encryption
//! (ChaCha20-Poly1305 under a key agreed between sender and recipient).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::AgentId;
use crate::Error;
use crate::kdf;

/// An X25519 key pair. The secret is zeroized on drop.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KeyPair {
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_secret_bytes(*bytes)
    }

    /// The pair of a (possibly reconstructed) 32-byte secret.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret's bytes, for Shamir sharing.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// X25519 with `their_public`; a low-order (all-zero) result is refused,
    /// so a peer cannot force a known shared secret.
    fn agree(&self, their_public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*their_public));
        if !shared.was_contributory() {
            return Err(Error::WeakPublicKey);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

fn pair_info(tag: &[u8], round: u64, a: AgentId, b: AgentId) -> Vec<u8> {
    let mut info = tag.to_vec();
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&a.to_le_bytes());
    info.extend_from_slice(&b.to_le_bytes());
    info
}

/// The seed both `me` and `peer` derive for their pairwise mask this round:
/// HKDF(DH(s_me, s_peer), round ‖ min id ‖ max id).
pub fn pairwise_seed(
    mine: &KeyPair,
    their_public: &[u8; 32],
    round: u64,
    me: AgentId,
    peer: AgentId,
) -> Result<Zeroizing<[u8; 32]>, Error> {
    let shared = mine.agree(their_public)?;
    let info = pair_info(b"pair", round, me.min(peer), me.max(peer));
    Ok(Zeroizing::new(kdf::derive(
        shared.as_ref(),
        "fedmicse-secagg/pairwise/v1",
        &info,
    )))
}

/// A key per direction (sender → recipient) and round: each key encrypts one
/// message only, so the fixed nonce is never reused.
fn share_cipher(
    mine: &KeyPair,
    their_public: &[u8; 32],
    round: u64,
    from: AgentId,
    to: AgentId,
) -> Result<ChaCha20Poly1305, Error> {
    let shared = mine.agree(their_public)?;
    let info = pair_info(b"share", round, from, to);
    let key = Zeroizing::new(kdf::derive(
        shared.as_ref(),
        "fedmicse-secagg/share/v1",
        &info,
    ));
    Ok(ChaCha20Poly1305::new(Key::from_slice(key.as_ref())))
}

/// Associated data: the ciphertext only opens for this sender, recipient and
/// round, so a coordinator cannot replay it elsewhere.
fn share_aad(round: u64, from: AgentId, to: AgentId) -> Vec<u8> {
    pair_info(b"fedmicse-secagg/share-aad/v1", round, from, to)
}

/// AEAD tag bytes added to every share ciphertext.
pub const TAG_BYTES: usize = 16;

/// Encrypts `plaintext` from `from` (key pair `mine`) to `to` (`their_public`).
pub fn seal_share(
    mine: &KeyPair,
    their_public: &[u8; 32],
    round: u64,
    from: AgentId,
    to: AgentId,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let cipher = share_cipher(mine, their_public, round, from, to)?;
    let aad = share_aad(round, from, to);
    let payload = Payload {
        msg: plaintext,
        aad: &aad,
    };
    cipher
        .encrypt(Nonce::from_slice(&[0u8; 12]), payload)
        .map_err(|_| Error::Encrypt)
}

/// Decrypts a share sent by `from` (`their_public`) to `to` (key pair `mine`).
pub fn open_share(
    mine: &KeyPair,
    their_public: &[u8; 32],
    round: u64,
    from: AgentId,
    to: AgentId,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = share_cipher(mine, their_public, round, from, to)?;
    let aad = share_aad(round, from, to);
    let payload = Payload {
        msg: ciphertext,
        aad: &aad,
    };
    cipher
        .decrypt(Nonce::from_slice(&[0u8; 12]), payload)
        .map(Zeroizing::new)
        .map_err(|_| Error::Decrypt { from })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn pairs() -> (KeyPair, KeyPair, KeyPair) {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        (
            KeyPair::generate(&mut rng),
            KeyPair::generate(&mut rng),
            KeyPair::generate(&mut rng),
        )
    }

    #[test]
    fn pairwise_seed_is_symmetric_and_round_bound() {
        let (a, b, _) = pairs();
        let ab = pairwise_seed(&a, &b.public(), 3, 1, 2).unwrap();
        let ba = pairwise_seed(&b, &a.public(), 3, 2, 1).unwrap();
        assert_eq!(*ab, *ba);
        assert_ne!(*ab, *pairwise_seed(&a, &b.public(), 4, 1, 2).unwrap());
        // A reconstructed secret gives the same seed.
        let again = KeyPair::from_secret_bytes(*a.secret_bytes());
        assert_eq!(*ab, *pairwise_seed(&again, &b.public(), 3, 1, 2).unwrap());
    }

    #[test]
    fn share_round_trip() {
        let (a, b, _) = pairs();
        let ct = seal_share(&a, &b.public(), 7, 1, 2, b"hello").unwrap();
        let pt = open_share(&b, &a.public(), 7, 1, 2, &ct).unwrap();
        assert_eq!(pt.as_slice(), b"hello");
    }

    #[test]
    fn share_bound_to_sender_recipient_round_and_bytes() {
        let (a, b, c) = pairs();
        let ct = seal_share(&a, &b.public(), 7, 1, 2, b"hello").unwrap();
        let wrong_round = open_share(&b, &a.public(), 8, 1, 2, &ct);
        assert!(matches!(wrong_round, Err(Error::Decrypt { from: 1 })));
        let wrong_recipient = open_share(&c, &a.public(), 7, 1, 3, &ct);
        assert!(matches!(wrong_recipient, Err(Error::Decrypt { .. })));
        // Same keys but a relabelled recipient id: the AAD no longer matches.
        assert!(open_share(&b, &a.public(), 7, 1, 3, &ct).is_err());
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert!(open_share(&b, &a.public(), 7, 1, 2, &tampered).is_err());
    }

    #[test]
    fn low_order_public_key_refused() {
        let (a, _, _) = pairs();
        assert!(matches!(
            pairwise_seed(&a, &[0u8; 32], 1, 1, 2),
            Err(Error::WeakPublicKey)
        ));
    }
}

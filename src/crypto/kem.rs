//! ML-KEM-768 (FIPS 203), the post-quantum half of a hybrid link envelope
//! (docs/FORMAT.md §1.4, §4.2b): a node's published encapsulation key, the
//! RSA signature that ties it to the node id, and encapsulation to it.
//!
//! Like the rest of this room only public-key work is here; decapsulation
//! belongs to the node's [`KemKey`](crate::identity::KemKey).

use aws_lc_rs::kem::{EncapsulationKey, ML_KEM_768};
use rsa::RsaPublicKey;
use zeroize::Zeroizing;

use super::{verify_pss, NodeId};
use crate::error::{Error, Result};

/// An ML-KEM-768 encapsulation key's length (FIPS 203 `ek`).
pub const ENCAPSULATION_KEY_LEN: usize = 1184;
/// An ML-KEM-768 decapsulation key's length (FIPS 203 `dk`, expanded form).
pub const DECAPSULATION_KEY_LEN: usize = 2400;
/// An ML-KEM-768 ciphertext's length.
pub const CIPHERTEXT_LEN: usize = 1088;
/// Where `ek` sits inside `dk` (FIPS 203: `dk = dk_PKE || ek || H(ek) || z`).
pub const EK_IN_DK: std::ops::Range<usize> = 1152..1152 + ENCAPSULATION_KEY_LEN;
/// Domain of the signature over a published encapsulation key.
const KEM_KEY_DOMAIN: &[u8] = b"bitsync-kem-key-v1";
/// The longest RSA signature accepted over a key (8192-bit node keys).
const MAX_SIGNATURE: usize = 1024;

/// What a node's RSA-PSS signature over its encapsulation key covers:
/// `"bitsync-kem-key-v1" || 00 || node id (32) || ek (1184)`.
pub fn key_message(node: &NodeId, encapsulation_key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(KEM_KEY_DOMAIN.len() + 1 + 32 + encapsulation_key.len());
    m.extend_from_slice(KEM_KEY_DOMAIN);
    m.push(0);
    m.extend_from_slice(&node.0);
    m.extend_from_slice(encapsulation_key);
    m
}

/// Check that `encapsulation_key` is an ML-KEM-768 key that the node whose
/// public key is `public` (node id `node`) signed. Wrong lengths and bad
/// signatures are `Integrity` (DATA_LOSS on the wire).
pub fn verify_key(
    node: &NodeId,
    public: &RsaPublicKey,
    encapsulation_key: &[u8],
    signature: &[u8],
) -> Result<()> {
    if encapsulation_key.len() != ENCAPSULATION_KEY_LEN || signature.len() > MAX_SIGNATURE {
        return Err(Error::integrity(format!(
            "ML-KEM key of node {} has {} bytes (expected {ENCAPSULATION_KEY_LEN}) or an oversized signature",
            node.short(),
            encapsulation_key.len()
        )));
    }
    if !verify_pss(public, &key_message(node, encapsulation_key), signature) {
        return Err(Error::integrity(format!(
            "ML-KEM key of node {} is not signed by its node key",
            node.short()
        )));
    }
    EncapsulationKey::new(&ML_KEM_768, encapsulation_key)
        .map(drop)
        .map_err(|_| Error::integrity("not an ML-KEM-768 encapsulation key"))
}

/// Encapsulate a fresh shared secret to `encapsulation_key`: (ciphertext, secret).
pub fn encapsulate(encapsulation_key: &[u8]) -> Result<(Vec<u8>, Zeroizing<[u8; 32]>)> {
    let ek = EncapsulationKey::new(&ML_KEM_768, encapsulation_key)
        .map_err(|_| Error::integrity("not an ML-KEM-768 encapsulation key"))?;
    let (ct, ss) = ek
        .encapsulate()
        .map_err(|_| Error::io("ML-KEM-768 encapsulation failed"))?;
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(ss.as_ref());
    Ok((ct.as_ref().to_vec(), secret))
}

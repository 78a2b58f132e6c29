//! Format 2 key hierarchy (docs/FORMAT.md §4.2–4.4): per-pair link keys,
//! sent once inside a signed link envelope, and per-item envelopes that are
//! AES-256-GCM under a link key. The asymmetric work is once per pair of
//! nodes; per item only symmetric work remains.
//!
//! A link envelope is `BLE2` (the secret RSA-OAEP-wrapped) or, when the
//! recipient's ML-KEM-768 key is known, the hybrid `BLE3` (§4.2b): the RSA
//! wrap and an ML-KEM ciphertext, the link key derived from both secrets,
//! so breaking RSA alone (a recorded envelope and a future quantum
//! computer) or ML-KEM alone reveals nothing.
//!
//! Like the rest of this room, only public-key operations are here: the
//! caller signs and unwraps with its [`Identity`](crate::identity::Identity).

use std::fmt;

use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use rand::RngCore;
use rsa::RsaPublicKey;
use zeroize::Zeroizing;

use super::{
    gcm_key, gcm_open, gcm_seal, kem, verify_pss, wrap_secret, ContentId, Hash, ItemKey, NodeId,
};
use crate::error::{Error, Result};

const LINK_MAGIC: &[u8; 4] = b"BLE2";
/// The hybrid link envelope (RSA-OAEP and ML-KEM-768), FORMAT.md §4.2b.
const HYBRID_MAGIC: &[u8; 4] = b"BLE3";
const ITEM_MAGIC: &[u8; 4] = b"BIE2";
/// Domain of the `BLE2` link signature and its HKDF salt.
const LINK_DOMAIN: &[u8] = b"bitsync-link-v2";
/// Domain of the `BLE3` signature and its HKDF salt: a distinct label, so a
/// `BLE2` and a `BLE3` key never coincide even for equal inputs.
const HYBRID_DOMAIN: &[u8] = b"bitsync-link-v3";
const ITEM_AAD: &[u8] = b"bitsync-item-envelope-v2\0";
const SEAL_AAD: &[u8] = b"bitsync-link-seal-v2\0";
/// An item envelope's length: magic, sender, generation, nonce, key, tag.
pub const ITEM_ENVELOPE_LEN: usize = 4 + 32 + 4 + 12 + 32 + 16;
/// The longest RSA wrap or signature a link envelope may carry (8192-bit keys).
const MAX_RSA_FIELD: usize = 1024;

/// Which link key: `L(sender→recipient)` of one generation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LinkId {
    pub sender: NodeId,
    pub recipient: NodeId,
    pub generation: u32,
}

impl LinkId {
    /// sender || recipient || generation (BE): the HKDF info and the tail of every AAD.
    fn bytes(&self) -> [u8; 68] {
        let mut b = [0u8; 68];
        b[..32].copy_from_slice(&self.sender.0);
        b[32..64].copy_from_slice(&self.recipient.0);
        b[64..].copy_from_slice(&self.generation.to_be_bytes());
        b
    }
}

/// A 256-bit link key. Zeroed when dropped, never printed.
#[derive(Clone)]
pub struct LinkKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// HKDF-SHA256(salt = the version's domain, IKM = the transported
    /// secret(s), info = the link id): IKM is `S` for `BLE2`, `S || ss` for `BLE3`.
    fn derive(id: &LinkId, domain: &[u8], ikm: &[u8]) -> LinkKey {
        let info = id.bytes();
        let info_parts: [&[u8]; 1] = [&info];
        let mut out = Zeroizing::new([0u8; 32]);
        Salt::new(HKDF_SHA256, domain)
            .extract(ikm)
            .expand(&info_parts, HKDF_SHA256)
            .and_then(|okm| okm.fill(out.as_mut()))
            .expect("HKDF-SHA256 yields 32 bytes");
        LinkKey(out)
    }
}

/// A parsed link envelope (FORMAT.md §4.2), not yet verified.
pub struct LinkEnvelope {
    pub id: LinkId,
    wrapped: Vec<u8>,
    /// The ML-KEM-768 ciphertext of a hybrid (`BLE3`) envelope.
    kem_ciphertext: Option<Vec<u8>>,
    /// Every byte before `sig_len`: what the signature covers, after the domain.
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn link_message(domain: &[u8], signed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + signed.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(signed);
    m
}

/// `S || ss`, the hybrid IKM.
fn hybrid_ikm(secret: &[u8], kem_secret: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(secret.len() + kem_secret.len()));
    ikm.extend_from_slice(secret);
    ikm.extend_from_slice(kem_secret);
    ikm
}

/// Make `L(id)` and its link envelope to `recipient`, signed with `sign`
/// (the sender's RSA-PSS over the message it is given): hybrid `BLE3` when
/// the recipient's ML-KEM-768 encapsulation key `kem_key` is known, else `BLE2`.
pub fn make_link(
    id: LinkId,
    recipient: &RsaPublicKey,
    kem_key: Option<&[u8]>,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<(LinkKey, Vec<u8>)> {
    let mut secret = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(secret.as_mut());
    let wrapped = wrap_secret(recipient, secret.as_ref());
    let kem = kem_key.map(kem::encapsulate).transpose()?;
    let (magic, domain) = match kem {
        Some(_) => (HYBRID_MAGIC, HYBRID_DOMAIN),
        None => (LINK_MAGIC, LINK_DOMAIN),
    };
    let mut out = Vec::with_capacity(80 + 2 * wrapped.len() + kem::CIPHERTEXT_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&id.bytes());
    out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
    out.extend_from_slice(&wrapped);
    if let Some((ct, _)) = &kem {
        out.extend_from_slice(ct);
    }
    let signature = sign(&link_message(domain, &out));
    out.extend_from_slice(&(signature.len() as u16).to_be_bytes());
    out.extend_from_slice(&signature);
    let key = match &kem {
        Some((_, ss)) => LinkKey::derive(&id, domain, &hybrid_ikm(secret.as_ref(), ss.as_ref())),
        None => LinkKey::derive(&id, domain, secret.as_ref()),
    };
    Ok((key, out))
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if b.len() < n {
        return Err(Error::integrity("link envelope is truncated"));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn take_u16_field<'a>(b: &mut &'a [u8], what: &str) -> Result<&'a [u8]> {
    let n = u16::from_be_bytes(take(b, 2)?.try_into().expect("2 bytes")) as usize;
    if n > MAX_RSA_FIELD {
        return Err(Error::integrity(format!(
            "link envelope's {what} claims {n} bytes, more than {MAX_RSA_FIELD}"
        )));
    }
    take(b, n)
}

impl LinkEnvelope {
    pub fn parse(bytes: &[u8]) -> Result<LinkEnvelope> {
        let mut b = bytes;
        let hybrid = match take(&mut b, 4)? {
            m if m == LINK_MAGIC => false,
            m if m == HYBRID_MAGIC => true,
            _ => {
                return Err(Error::integrity(
                    "not a link envelope (magic is neither BLE2 nor BLE3)",
                ))
            }
        };
        let sender = Hash::from_slice(take(&mut b, 32)?)?;
        let recipient = Hash::from_slice(take(&mut b, 32)?)?;
        let generation = u32::from_be_bytes(take(&mut b, 4)?.try_into().expect("4 bytes"));
        let wrapped = take_u16_field(&mut b, "wrapped secret")?.to_vec();
        let kem_ciphertext = match hybrid {
            true => Some(take(&mut b, kem::CIPHERTEXT_LEN)?.to_vec()),
            false => None,
        };
        let signed = bytes[..bytes.len() - b.len()].to_vec();
        let signature = take_u16_field(&mut b, "signature")?.to_vec();
        if !b.is_empty() || generation == 0 {
            return Err(Error::integrity(
                "link envelope has trailing bytes or generation 0",
            ));
        }
        Ok(LinkEnvelope {
            id: LinkId {
                sender,
                recipient,
                generation,
            },
            wrapped,
            kem_ciphertext,
            signed,
            signature,
        })
    }

    /// Whether this is a hybrid (`BLE3`) envelope.
    pub fn is_hybrid(&self) -> bool {
        self.kem_ciphertext.is_some()
    }

    fn domain(&self) -> &'static [u8] {
        match self.is_hybrid() {
            true => HYBRID_DOMAIN,
            false => LINK_DOMAIN,
        }
    }

    /// Check the sender's signature; `sender_spki` must be the key the sender id names.
    pub fn verify(&self, sender_spki: &[u8]) -> Result<()> {
        if Hash::of(sender_spki) != self.id.sender {
            return Err(Error::integrity(
                "link envelope's sender is not the key it was checked with",
            ));
        }
        let public =
            <RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(sender_spki)
                .map_err(|_| Error::integrity("link envelope's sender key is not an RSA key"))?;
        if !verify_pss(
            &public,
            &link_message(self.domain(), &self.signed),
            &self.signature,
        ) {
            return Err(Error::integrity(format!(
                "link envelope from {} does not verify: it was altered or forged",
                self.id.sender.short()
            )));
        }
        Ok(())
    }

    /// The RSA-OAEP wrap of the secret, for the recipient's node key to open.
    pub fn wrapped_secret(&self) -> &[u8] {
        &self.wrapped
    }

    /// The ML-KEM-768 ciphertext of a `BLE3` envelope, for the recipient's
    /// decapsulation key to open.
    pub fn kem_ciphertext(&self) -> Option<&[u8]> {
        self.kem_ciphertext.as_deref()
    }

    /// The link key from the secret [`Self::wrapped_secret`] opened to and,
    /// for a `BLE3` envelope, the shared secret [`Self::kem_ciphertext`]
    /// decapsulated to (`None` for `BLE2`).
    pub fn key(&self, secret: &[u8], kem_secret: Option<&[u8]>) -> Result<LinkKey> {
        if secret.len() != 32 {
            return Err(Error::integrity(format!(
                "link envelope's secret has {} bytes, expected 32",
                secret.len()
            )));
        }
        match (self.is_hybrid(), kem_secret) {
            (false, None) => Ok(LinkKey::derive(&self.id, LINK_DOMAIN, secret)),
            (true, Some(ss)) if ss.len() == 32 => Ok(LinkKey::derive(
                &self.id,
                HYBRID_DOMAIN,
                &hybrid_ikm(secret, ss),
            )),
            _ => Err(Error::integrity(
                "link envelope's ML-KEM secret is missing, unexpected or not 32 bytes",
            )),
        }
    }
}

fn item_aad(id: &LinkId, content_id: &ContentId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(ITEM_AAD.len() + 32 + 68);
    aad.extend_from_slice(ITEM_AAD);
    aad.extend_from_slice(&content_id.0);
    aad.extend_from_slice(&id.bytes());
    aad
}

/// Wrap an item key for `id.recipient` under `L(id)` (FORMAT.md §4.3).
pub fn wrap_item(link: &LinkKey, id: &LinkId, content_id: &ContentId, key: &ItemKey) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = gcm_seal(
        &gcm_key(link.0.as_ref()),
        nonce,
        &item_aad(id, content_id),
        key.as_bytes(),
    );
    let mut out = Vec::with_capacity(ITEM_ENVELOPE_LEN);
    out.extend_from_slice(ITEM_MAGIC);
    out.extend_from_slice(&id.sender.0);
    out.extend_from_slice(&id.generation.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Which sender's link key, of which generation, an item envelope uses;
/// `None` when the bytes are an RSA (format 1) envelope.
pub fn item_link(envelope: &[u8]) -> Option<(NodeId, u32)> {
    if envelope.len() != ITEM_ENVELOPE_LEN || !envelope.starts_with(ITEM_MAGIC) {
        return None;
    }
    let sender = Hash(envelope[4..36].try_into().expect("32 bytes"));
    let generation = u32::from_be_bytes(envelope[36..40].try_into().expect("4 bytes"));
    Some((sender, generation))
}

/// Open an item envelope addressed to `id.recipient` for `content_id`.
pub fn open_item(
    link: &LinkKey,
    id: &LinkId,
    content_id: &ContentId,
    envelope: &[u8],
) -> Result<ItemKey> {
    let bad = || {
        Error::integrity(format!(
            "item envelope for {} does not open under link key {}→{} generation {}: \
             it was altered, or moved to another item or recipient",
            content_id.short(),
            id.sender.short(),
            id.recipient.short(),
            id.generation
        ))
    };
    if item_link(envelope) != Some((id.sender, id.generation)) {
        return Err(bad());
    }
    let nonce: [u8; 12] = envelope[40..52].try_into().expect("12 bytes");
    let plain = gcm_open(
        &gcm_key(link.0.as_ref()),
        nonce,
        &item_aad(id, content_id),
        &envelope[52..],
    )
    .ok_or_else(bad)?;
    ItemKey::from_bytes(&plain)
}

fn seal_aad(id: &LinkId) -> Vec<u8> {
    let mut aad = SEAL_AAD.to_vec();
    aad.extend_from_slice(&id.bytes());
    aad
}

/// Seal link key `key` (of `id`) under the node's own `L(self→self)` for storing.
pub fn seal_link(own: &LinkKey, id: &LinkId, key: &LinkKey) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut out = nonce.to_vec();
    out.extend_from_slice(&gcm_seal(
        &gcm_key(own.0.as_ref()),
        nonce,
        &seal_aad(id),
        key.0.as_ref(),
    ));
    out
}

/// Open a link key sealed by [`seal_link`].
pub fn open_sealed_link(own: &LinkKey, id: &LinkId, sealed: &[u8]) -> Result<LinkKey> {
    let bad = || Error::integrity("a stored link key does not open: the database was altered");
    if sealed.len() != 12 + 32 + 16 {
        return Err(bad());
    }
    let nonce: [u8; 12] = sealed[..12].try_into().expect("12 bytes");
    let plain = Zeroizing::new(
        gcm_open(
            &gcm_key(own.0.as_ref()),
            nonce,
            &seal_aad(id),
            &sealed[12..],
        )
        .ok_or_else(bad)?,
    );
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(&plain);
    Ok(LinkKey(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(g: u32) -> LinkId {
        LinkId {
            sender: Hash::of(b"x"),
            recipient: Hash::of(b"p"),
            generation: g,
        }
    }

    #[test]
    fn item_envelope_binds_content_recipient_and_generation() {
        let l = LinkKey::derive(&id(1), LINK_DOMAIN, &[7; 32]);
        let cid = Hash::of(b"item");
        let k = ItemKey::random();
        let env = wrap_item(&l, &id(1), &cid, &k);
        assert_eq!(env.len(), ITEM_ENVELOPE_LEN);
        assert_eq!(item_link(&env), Some((id(1).sender, 1)));
        assert_eq!(
            open_item(&l, &id(1), &cid, &env).unwrap().as_bytes(),
            k.as_bytes()
        );
        assert!(open_item(&l, &id(1), &Hash::of(b"other"), &env).is_err());
        let swapped = LinkId {
            recipient: Hash::of(b"q"),
            ..id(1)
        };
        assert!(open_item(&l, &swapped, &cid, &env).is_err());
        assert!(open_item(&l, &id(2), &cid, &env).is_err());
        let mut bad = env.clone();
        bad[60] ^= 1;
        assert!(open_item(&l, &id(1), &cid, &bad).is_err());
    }

    #[test]
    fn sealed_link_key_round_trips_and_binds_its_id() {
        let own = LinkKey::derive(&id(1), LINK_DOMAIN, &[1; 32]);
        let l = LinkKey::derive(&id(2), LINK_DOMAIN, &[2; 32]);
        let s = seal_link(&own, &id(2), &l);
        assert_eq!(open_sealed_link(&own, &id(2), &s).unwrap().0, l.0);
        assert!(open_sealed_link(&own, &id(3), &s).is_err());
    }
}

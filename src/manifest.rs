//! Signed manifests: what an item is made of, vouched for by its publisher.
//!
//! The body is a protobuf [`ManifestBody`] whose bytes are signed as they are
//! (RSA-PSS-SHA256, see [`Identity::sign_manifest`]). The content id is the
//! SHA-256 of those body bytes, never of the plaintext, so equal files
//! published twice get different ids and reveal nothing about each other.
//! Envelopes (the item key wrapped per recipient) live beside the manifest,
//! outside the signed body, so new recipients can be added without re-signing.

use prost::Message;
use rsa::RsaPublicKey;

use crate::crypto::{self, ChunkId, ContentId, Hash, NodeId};
use crate::error::{Error, Result};
use crate::identity::{self, Identity};
pub use crate::proto::{Cipher, ItemMeta, ManifestBody};

pub(crate) const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Chunks stay well under tonic's 4 MiB message limit.
pub(crate) const MAX_CHUNK_SIZE: u32 = 2 * 1024 * 1024;
/// A manifest body larger than this is refused before decoding (about 100k chunks).
pub(crate) const MAX_BODY_BYTES: usize = 3 * 1024 * 1024 + 64 * 1024;
/// Chunks one item may have: each chunk id takes 34 bytes of the body (field
/// tag, length, 32-byte hash), and 64 KiB stay for the other fields.
pub const MAX_CHUNKS_PER_ITEM: u64 = (3 * 1024 * 1024 / 34) as u64;

/// Refuse, before anything is written, an item of `size` plaintext bytes
/// that would need more chunks than one manifest can list.
pub(crate) fn check_item_size(size: u64, chunk_size: u32) -> Result<()> {
    let chunks = size.div_ceil(chunk_size as u64).max(1);
    if chunks <= MAX_CHUNKS_PER_ITEM {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "an item of {size} bytes needs {chunks} chunks of {chunk_size} bytes, and one item \
         holds at most {MAX_CHUNKS_PER_ITEM} ({:.1} GiB at this chunk size): split the file, \
         or raise chunk_size in config.toml (at most {MAX_CHUNK_SIZE})",
        (MAX_CHUNKS_PER_ITEM * chunk_size as u64) as f64 / (1u64 << 30) as f64
    )))
}
const GCM_TAG: u64 = 16;

/// A manifest whose structure and signature have been checked.
#[derive(Clone, Debug)]
pub struct Manifest {
    body_bytes: Vec<u8>,
    signature: Vec<u8>,
    body: ManifestBody,
    id: ContentId,
    publisher: NodeId,
}

impl Manifest {
    /// Encode and sign a new body with this node's key.
    pub fn create(identity: &Identity, body: ManifestBody) -> Result<Manifest> {
        let body_bytes = body.encode_to_vec();
        let signature = identity.sign_manifest(&body_bytes);
        Manifest::from_signed(body_bytes, signature)
    }

    /// Accept a manifest received or read from storage: decode, check its
    /// structure, and verify the publisher's signature over the exact bytes.
    pub fn from_signed(body_bytes: Vec<u8>, signature: Vec<u8>) -> Result<Manifest> {
        if body_bytes.len() > MAX_BODY_BYTES {
            return Err(Error::invalid(format!(
                "manifest body is {} bytes, over the limit",
                body_bytes.len()
            )));
        }
        let id = Hash::of(&body_bytes);
        let body = ManifestBody::decode(body_bytes.as_slice())
            .map_err(|e| Error::integrity(format!("manifest {id} does not decode: {e}")))?;
        // Whatever is wrong with bytes that claim to be a signed manifest, they were altered.
        let altered = |e: Error, what: &str| {
            Error::integrity(format!("manifest {id}{what}: {}", e.message()))
        };
        check_structure(&body).map_err(|e| altered(e, ""))?;
        let public = identity::public_key_from_spki(&body.publisher_key)
            .map_err(|e| altered(e, ": publisher key"))?;
        crypto::verify_manifest(&public, &body_bytes, &signature)
            .map_err(|e| e.context(format!("manifest {id}")))?;
        let publisher = identity::node_id_of(&body.publisher_key);
        Ok(Manifest {
            body_bytes,
            signature,
            body,
            id,
            publisher,
        })
    }

    pub fn id(&self) -> ContentId {
        self.id
    }
    pub fn body(&self) -> &ManifestBody {
        &self.body
    }
    pub fn body_bytes(&self) -> &[u8] {
        &self.body_bytes
    }
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }
    pub fn publisher(&self) -> NodeId {
        self.publisher
    }
    pub fn publisher_key(&self) -> Result<RsaPublicKey> {
        identity::public_key_from_spki(&self.body.publisher_key)
    }
    pub fn chunk_count(&self) -> usize {
        self.body.chunk_ids.len()
    }
    pub fn chunk_id(&self, index: usize) -> ChunkId {
        Hash::from_slice(&self.body.chunk_ids[index]).expect("checked in check_structure")
    }
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.body
            .chunk_ids
            .iter()
            .map(|c| Hash::from_slice(c).expect("checked in check_structure"))
    }
    /// Ciphertext length of chunk `index`, as the structure dictates.
    pub fn chunk_len(&self, index: usize) -> u64 {
        chunk_cipher_len(&self.body, index)
    }
}

/// Number of ciphertext bytes the item's cipher produces for `size` plaintext bytes.
pub(crate) fn cipher_total(body: &ManifestBody) -> u64 {
    match body.cipher() {
        Cipher::Aes256GcmChunked => {
            let n = expected_chunks(body);
            body.size + n * GCM_TAG
        }
        _ => (body.size / 16 + 1) * 16,
    }
}

fn expected_chunks(body: &ManifestBody) -> u64 {
    let cs = body.chunk_size as u64;
    match body.cipher() {
        Cipher::Aes256GcmChunked => body.size.div_ceil(cs).max(1),
        _ => cipher_total(body).div_ceil(cs),
    }
}

pub(crate) fn chunk_cipher_len(body: &ManifestBody, index: usize) -> u64 {
    let n = body.chunk_ids.len() as u64;
    let i = index as u64;
    let cs = body.chunk_size as u64;
    match body.cipher() {
        Cipher::Aes256GcmChunked => {
            let plain = if i + 1 < n {
                cs
            } else {
                body.size - cs * (n - 1)
            };
            plain + GCM_TAG
        }
        _ => {
            if i + 1 < n {
                cs
            } else {
                cipher_total(body) - cs * (n - 1)
            }
        }
    }
}

pub(crate) fn check_structure(b: &ManifestBody) -> Result<()> {
    if b.format_version != FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "unsupported format version {}",
            b.format_version
        )));
    }
    match b.cipher() {
        Cipher::Aes256GcmChunked => {
            if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&b.chunk_size) {
                return Err(Error::integrity(format!(
                    "chunk size {} is out of range",
                    b.chunk_size
                )));
            }
        }
        Cipher::AxonAes256Cbc => {
            if b.chunk_size == 0 || b.chunk_size > MAX_CHUNK_SIZE || b.chunk_size % 16 != 0 {
                return Err(Error::integrity(format!(
                    "legacy chunk size {} is out of range",
                    b.chunk_size
                )));
            }
            if b.legacy_iv.len() != 16 || b.legacy_plain_sha256.len() != 32 {
                return Err(Error::integrity(
                    "legacy manifest lacks its IV or plaintext hash",
                ));
            }
        }
        Cipher::Unspecified => return Err(Error::integrity("manifest names no cipher")),
    }
    // Before any arithmetic on the size: a peer's 2^64 - 1 would overflow
    // the cipher's total (and, wrapped, pass as an item of no chunks). The
    // bound is what a body under MAX_BODY_BYTES can list at all (34 bytes a
    // chunk id), so no manifest accepted before is refused now.
    let most = (MAX_BODY_BYTES / 34) as u64 * u64::from(b.chunk_size);
    if b.size > most {
        return Err(Error::integrity(format!(
            "size {} is more than one manifest can describe ({most} bytes in chunks of {})",
            b.size, b.chunk_size
        )));
    }
    if b.chunk_ids.iter().any(|c| c.len() != 32) {
        return Err(Error::integrity("a chunk id is not 32 bytes"));
    }
    let want = expected_chunks(b);
    if b.chunk_ids.len() as u64 != want {
        return Err(Error::integrity(format!(
            "lists {} chunks but {} bytes in chunks of {} need {}",
            b.chunk_ids.len(),
            b.size,
            b.chunk_size,
            want
        )));
    }
    Ok(())
}

/// Build the body for a native item (chunks already encrypted and hashed).
pub fn native_body(
    publisher: &Identity,
    kind: &str,
    size: u64,
    chunk_size: u32,
    chunk_ids: Vec<ChunkId>,
    encrypted_meta: Vec<u8>,
    created_at_ms: i64,
) -> ManifestBody {
    ManifestBody {
        format_version: FORMAT_VERSION,
        publisher_key: publisher.spki().to_vec(),
        kind: kind.to_string(),
        size,
        chunk_size,
        chunk_ids: chunk_ids.into_iter().map(|c| c.0.to_vec()).collect(),
        created_at_ms,
        encrypted_meta,
        cipher: Cipher::Aes256GcmChunked as i32,
        legacy_iv: Vec::new(),
        legacy_plain_sha256: Vec::new(),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_body(size: u64, chunk_ids: Vec<Vec<u8>>) -> ManifestBody {
        ManifestBody {
            format_version: FORMAT_VERSION,
            size,
            chunk_size: 4096,
            chunk_ids,
            cipher: Cipher::AxonAes256Cbc as i32,
            legacy_iv: vec![0; 16],
            legacy_plain_sha256: vec![0; 32],
            ..Default::default()
        }
    }

    /// Found while writing the manifest_body fuzz target: a legacy size near
    /// 2^64 overflowed the cipher's total (a panic with overflow checks; in
    /// a release build it wrapped to 0 and passed as an item of no chunks).
    #[test]
    fn a_size_beyond_what_a_manifest_can_list_is_refused() {
        let listable = (MAX_BODY_BYTES / 34) as u64;
        for size in [u64::MAX, u64::MAX - 15, listable * 4096 + 1] {
            let e = check_structure(&legacy_body(size, Vec::new())).unwrap_err();
            assert_eq!(e.kind(), crate::error::Kind::Integrity);
            assert!(e.message().contains("more than one manifest"), "{e}");
        }
        let ok = legacy_body(4096 * 2 - 17, vec![vec![1; 32], vec![2; 32]]);
        check_structure(&ok).unwrap();
        assert_eq!(
            chunk_cipher_len(&ok, 0) + chunk_cipher_len(&ok, 1),
            cipher_total(&ok)
        );
    }

    /// The largest item `check_item_size` lets through still signs: its body
    /// fits under MAX_BODY_BYTES with a name of 4 KiB.
    #[test]
    fn the_largest_item_allowed_fits_in_a_manifest() {
        let chunk = MIN_CHUNK_SIZE;
        let size = MAX_CHUNKS_PER_ITEM * chunk as u64;
        check_item_size(size, chunk).unwrap();
        let e = check_item_size(size + 1, chunk).unwrap_err();
        assert!(e.to_string().contains("at most 92521"), "{e}");
        let id = Identity::generate().unwrap();
        let ids = (0..MAX_CHUNKS_PER_ITEM)
            .map(|i| Hash::of(&i.to_le_bytes()))
            .collect();
        let body = native_body(&id, "file", size, chunk, ids, vec![7u8; 4096], 0);
        let m = Manifest::create(&id, body).unwrap();
        assert!(m.body_bytes().len() <= MAX_BODY_BYTES);
    }
}

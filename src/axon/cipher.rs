//! Keys and plaintext: Axon's key ids, unwrapping an item's AES key, and
//! decrypting an item (with the one AES-CBC decryptor, [`crate::legacy::CbcDecrypt`]).

use std::io::Write;

use md5::Md5;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::pieces::{check_piece_size, stream_piece};
use super::{AxonError, AxonItem, Result};
use crate::legacy::CbcDecrypt;

/// Axon's id for a public key: lowercase hex MD5 of the key serialized as a
/// SubjectPublicKeyInfo PEM (64-column base64, LF line ends) with surrounding
/// whitespace stripped. This is how Axon names the envelope meant for a key in
/// `encrypted_aes_keys`.
pub fn key_id(public_key: &RsaPublicKey) -> String {
    let pem = public_key
        .to_public_key_pem(LineEnding::LF)
        .expect("encoding an RSA public key as SubjectPublicKeyInfo cannot fail");
    hex::encode(Md5::digest(pem.trim().as_bytes()))
}

/// Recovers `item`'s AES key with `private_key`: finds the envelope under the
/// key's [`key_id`] (ids compared ignoring ASCII case) and opens it with
/// RSA-OAEP-SHA256 (MGF1-SHA256, no label), using blinding against timing
/// side channels.
///
/// Fails with [`AxonError::NoEnvelope`] when the item was not encrypted to
/// this key, which is the usual symptom of passing the wrong key file.
pub fn unwrap_key(item: &AxonItem, private_key: &RsaPrivateKey) -> Result<Zeroizing<[u8; 32]>> {
    let id = key_id(&private_key.to_public_key());
    let keys = &item.manifest.encrypted_aes_keys;
    let envelope = keys
        .get(&id)
        .or_else(|| {
            keys.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&id))
                .map(|(_, v)| v)
        })
        .ok_or_else(|| AxonError::NoEnvelope {
            item: item.label(),
            key_id: id.clone(),
            available: keys.keys().cloned().collect(),
        })?;
    let plain = private_key
        .decrypt_blinded(&mut rand::thread_rng(), Oaep::new::<Sha256>(), envelope)
        .map(Zeroizing::new)
        .map_err(|e| AxonError::Unwrap {
            item: item.label(),
            key_id: id.clone(),
            reason: e.to_string(),
        })?;
    if plain.len() != 32 {
        return Err(AxonError::KeyLength {
            item: item.label(),
            key_id: id,
            len: plain.len(),
        });
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain);
    Ok(key)
}

/// Decrypts `item` with its AES `key` into `out` and returns the plaintext
/// length.
///
/// Streams: each piece is read and decrypted in blocks of 64 KiB (plus fewer
/// than 16 bytes carried over when a block does not end on an AES block, and
/// the newest plaintext block held back as possible padding), so memory does
/// not grow with `chunk_size`, which a crafted manifest may set to 4 GiB.
/// Every piece's SHA-256 is checked at its end, before the next piece is
/// read and before the padding is looked at; the PKCS7 padding at the end is
/// checked, and finally the plaintext's SHA-256 is compared with `content_hash`.
///
/// Plaintext is written to `out` as it is decrypted, before the final checks.
/// **On any error, what was written to `out` must be discarded**: it may be
/// incomplete, end in padding, or be the output of a wrong key.
pub fn decrypt_item(item: &AxonItem, key: &[u8; 32], out: &mut impl Write) -> Result<u64> {
    let m = &item.manifest;
    let n = item.chunk_paths.len();
    if n != m.chunk_hashes.len() {
        return Err(bad_item(
            item,
            format!(
                "{} piece paths for {} piece hashes",
                n,
                m.chunk_hashes.len()
            ),
        ));
    }
    if n == 0 {
        return Err(bad_item(
            item,
            "the manifest lists no pieces; an AES-CBC ciphertext is never empty",
        ));
    }
    check_piece_size(item)?;
    let mut dec = CbcDecrypt::new(key, &m.iv);
    let mut buf = vec![0u8; 64 * 1024];
    let mut plain: Vec<u8> = Vec::new();
    let mut ciphertext_len = 0u64;
    let mut written = 0u64;
    let mut last_len = 0;
    for (index, path) in item.chunk_paths.iter().enumerate() {
        last_len = stream_piece(item, index, path, &mut buf, &mut |block| {
            dec.update(block, &mut plain);
            written += write_plain(item, out, &plain)?;
            Ok(())
        })?;
        ciphertext_len += last_len;
    }
    if ciphertext_len % 16 != 0 {
        return Err(bad_item(
            item,
            format!("the ciphertext is {ciphertext_len} bytes, not a whole number of 16-byte AES blocks"),
        ));
    }
    if last_len == 0 {
        // Axon's reader found the padding in the last piece; an empty one has none.
        return Err(bad_item(
            item,
            "the last piece ends no AES block, so the padding cannot be found",
        ));
    }
    let (tail, actual) = dec
        .finish()
        .map_err(|_| AxonError::Padding { item: item.label() })?;
    written += write_plain(item, out, &tail)?;
    if actual != m.content_hash {
        return Err(AxonError::ContentHash {
            item: item.label(),
            expected: hex::encode(m.content_hash),
            actual: hex::encode(actual),
        });
    }
    Ok(written)
}

fn write_plain(item: &AxonItem, out: &mut impl Write, plain: &[u8]) -> Result<u64> {
    out.write_all(plain).map_err(|source| AxonError::Output {
        item: item.label(),
        source,
    })?;
    Ok(plain.len() as u64)
}

fn bad_item(item: &AxonItem, problem: impl Into<String>) -> AxonError {
    AxonError::BadItem {
        item: item.label(),
        problem: problem.into(),
    }
}

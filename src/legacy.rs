//! Reading items imported from Axon BBS, kept in their original cipher.
//!
//! Axon encrypted a whole item with AES-256-CBC/PKCS7 and sliced the
//! ciphertext into chunks; there is no MAC, so integrity comes from the chunk
//! hashes in our signed manifest and from Axon's plaintext SHA-256, checked at
//! the end. Decryption streams block by block and holds back only the last
//! block (for the padding), so memory stays flat.

use std::io::Write;

use aes::cipher::consts::U16;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecryptMut, KeyIvInit};

use crate::crypto::ItemKey;
use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::node::Node;

/// Why a CBC ciphertext did not end well (see [`CbcDecrypt::finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CbcEnd {
    /// The ciphertext is not a whole number of 16-byte blocks.
    PartialBlock,
    /// There was no ciphertext at all.
    Empty,
    /// The last block's PKCS7 padding is wrong: a wrong key or altered bytes.
    BadPadding,
}

/// Streaming AES-256-CBC/PKCS7 decryption, shared by legacy items and the
/// Axon backup reader. Ciphertext comes in pieces of any length; plaintext
/// goes out as soon as it cannot be padding: fewer than 16 ciphertext bytes
/// are carried to the next piece and the newest plaintext block is held back
/// until [`finish`](Self::finish), so memory stays flat. The plaintext's
/// SHA-256 is computed on the way, since both callers check one.
pub(crate) struct CbcDecrypt {
    dec: cbc::Decryptor<aes::Aes256>,
    /// Ciphertext bytes not yet a whole block (fewer than 16).
    partial: Vec<u8>,
    /// The newest plaintext block: the padding if no more ciphertext comes.
    held: Option<[u8; 16]>,
    hasher: crate::crypto::Hasher,
}

impl CbcDecrypt {
    pub(crate) fn new(key: &[u8; 32], iv: &[u8; 16]) -> CbcDecrypt {
        CbcDecrypt {
            dec: cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into()),
            partial: Vec::with_capacity(16),
            held: None,
            hasher: crate::crypto::Hasher::new(),
        }
    }

    /// Decrypt the next piece of ciphertext. `out` is cleared, then holds the
    /// plaintext released by this piece (possibly none).
    pub(crate) fn update(&mut self, ciphertext: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(16 + self.partial.len() + ciphertext.len());
        if let Some(h) = self.held.take() {
            out.extend_from_slice(&h);
        }
        let start = out.len();
        out.extend_from_slice(&self.partial);
        out.extend_from_slice(ciphertext);
        let whole_end = start + (out.len() - start) / 16 * 16;
        self.partial.clear();
        self.partial.extend_from_slice(&out[whole_end..]);
        out.truncate(whole_end);
        let (blocks, _) = InOutBuf::from(&mut out[start..]).into_chunks::<U16>();
        self.dec.decrypt_blocks_inout_mut(blocks);
        if out.len() >= 16 {
            let last = out.len() - 16;
            self.held = Some(out[last..].try_into().expect("16 bytes"));
            out.truncate(last);
        }
        self.hasher.update(&out[..]);
    }

    /// The end of the ciphertext: checks the padding and returns the last
    /// plaintext bytes and the SHA-256 of the whole plaintext.
    pub(crate) fn finish(self) -> std::result::Result<(Vec<u8>, [u8; 32]), CbcEnd> {
        if !self.partial.is_empty() {
            return Err(CbcEnd::PartialBlock);
        }
        let last = self.held.ok_or(CbcEnd::Empty)?;
        let pad = last[15] as usize;
        if pad == 0 || pad > 16 || last[16 - pad..].iter().any(|&b| b as usize != pad) {
            return Err(CbcEnd::BadPadding);
        }
        let tail = last[..16 - pad].to_vec();
        let mut hasher = self.hasher;
        hasher.update(&tail);
        Ok((tail, hasher.finish().0))
    }
}

pub(crate) fn decrypt_to(
    node: &Node,
    m: &Manifest,
    key: &ItemKey,
    w: &mut dyn Write,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    let body = m.body();
    let iv: &[u8; 16] = body
        .legacy_iv
        .as_slice()
        .try_into()
        .map_err(|_| Error::integrity(format!("legacy item {} has no 16-byte IV", m.id())))?;
    let mut dec = CbcDecrypt::new(key.as_bytes(), iv);
    let mut out = Vec::new();
    let mut written = 0u64;
    for (i, id) in m.chunk_ids().enumerate() {
        let ct = node.read_chunk(&id)?;
        if ct.len() as u64 != m.chunk_len(i) || ct.len() % 16 != 0 {
            return Err(Error::integrity(format!(
                "legacy chunk {i} of item {} has the wrong length",
                m.id()
            )));
        }
        dec.update(&ct, &mut out);
        w.write_all(&out).ctx("writing output")?;
        written += out.len() as u64;
        progress(written);
    }
    let (tail, sha256) = dec.finish().map_err(|e| match e {
        CbcEnd::Empty => Error::integrity("legacy item has no ciphertext"),
        CbcEnd::PartialBlock | CbcEnd::BadPadding => Error::integrity(format!(
            "legacy item {} has bad CBC padding: wrong key or altered",
            m.id()
        )),
    })?;
    w.write_all(&tail).ctx("writing output")?;
    written += tail.len() as u64;
    if sha256.as_slice() != body.legacy_plain_sha256.as_slice() {
        return Err(Error::integrity(format!(
            "legacy item {} does not match its plaintext hash",
            m.id()
        )));
    }
    progress(written);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::BlockEncryptMut;

    use super::*;

    fn encrypt(key: &[u8; 32], iv: &[u8; 16], plain: &[u8]) -> Vec<u8> {
        cbc::Encryptor::<aes::Aes256>::new(key.into(), iv.into())
            .encrypt_padded_vec_mut::<Pkcs7>(plain)
    }

    fn decrypt(key: &[u8; 32], iv: &[u8; 16], ct: &[u8], piece: usize) -> Result<Vec<u8>, CbcEnd> {
        let mut dec = CbcDecrypt::new(key, iv);
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        for p in ct.chunks(piece) {
            dec.update(p, &mut out);
            plain.extend_from_slice(&out);
        }
        let (tail, sha) = dec.finish()?;
        plain.extend_from_slice(&tail);
        assert_eq!(sha, crate::crypto::Hash::of(&plain).0);
        Ok(plain)
    }

    #[test]
    fn any_piece_size_gives_the_same_plaintext() {
        let (key, iv) = ([7u8; 32], [9u8; 16]);
        for len in [0usize, 1, 15, 16, 17, 100, 1000] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ct = encrypt(&key, &iv, &plain);
            for piece in [1, 5, 16, 33, ct.len()] {
                assert_eq!(
                    decrypt(&key, &iv, &ct, piece).unwrap(),
                    plain,
                    "{len} {piece}"
                );
            }
        }
    }

    #[test]
    fn bad_endings_are_told_apart() {
        let (key, iv) = ([7u8; 32], [9u8; 16]);
        let ct = encrypt(&key, &iv, b"some plaintext");
        assert_eq!(
            decrypt(&key, &iv, &ct[..ct.len() - 1], 7),
            Err(CbcEnd::PartialBlock)
        );
        assert_eq!(decrypt(&key, &iv, &[], 7), Err(CbcEnd::Empty));
        // A wrong key almost never yields valid padding (1 in ~256 for one block).
        assert_eq!(decrypt(&[8u8; 32], &iv, &ct, 16), Err(CbcEnd::BadPadding));
    }
}

//! Reading items imported from Axon BBS, kept in their original cipher.
//!
//! Axon encrypted a whole item with AES-256-CBC/PKCS7 and sliced the
//! ciphertext into chunks; there is no MAC, so integrity comes from the chunk
//! hashes in our signed manifest and from Axon's plaintext SHA-256, checked at
//! the end. Decryption streams block by block and holds back only the last
//! block (for the padding), so memory stays flat.

use std::io::Write;

use aes::cipher::{generic_array::GenericArray, BlockDecryptMut, KeyIvInit};
use sha2::{Digest, Sha256};

use crate::crypto::ItemKey;
use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::node::Node;

type CbcDec = cbc::Decryptor<aes::Aes256>;

pub fn decrypt_to(
    node: &Node,
    m: &Manifest,
    key: &ItemKey,
    w: &mut dyn Write,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    let body = m.body();
    let mut dec = CbcDec::new(
        key.as_bytes().into(),
        GenericArray::from_slice(&body.legacy_iv),
    );
    let mut hasher = Sha256::new();
    let mut held: Option<[u8; 16]> = None;
    let mut written = 0u64;
    for (i, id) in m.chunk_ids().enumerate() {
        let mut ct = node.read_chunk(&id)?;
        if ct.len() as u64 != m.chunk_len(i) || ct.len() % 16 != 0 {
            return Err(Error::integrity(format!(
                "legacy chunk {i} of item {} has the wrong length",
                m.id()
            )));
        }
        for block in ct.chunks_exact_mut(16) {
            dec.decrypt_block_mut(GenericArray::from_mut_slice(block));
        }
        // Everything but the newest block can be released.
        let mut out = Vec::with_capacity(ct.len());
        if let Some(h) = held.take() {
            out.extend_from_slice(&h);
        }
        let (body_part, last) = ct.split_at(ct.len() - 16);
        out.extend_from_slice(body_part);
        held = Some(last.try_into().unwrap());
        hasher.update(&out);
        w.write_all(&out).ctx("writing output")?;
        written += out.len() as u64;
        progress(written);
    }
    let last = held.ok_or_else(|| Error::integrity("legacy item has no ciphertext"))?;
    let pad = last[15] as usize;
    if pad == 0 || pad > 16 || last[16 - pad..].iter().any(|&b| b as usize != pad) {
        return Err(Error::integrity(format!(
            "legacy item {} has bad CBC padding: wrong key or altered",
            m.id()
        )));
    }
    let tail = &last[..16 - pad];
    hasher.update(tail);
    w.write_all(tail).ctx("writing output")?;
    written += tail.len() as u64;
    if hasher.finalize().as_slice() != body.legacy_plain_sha256.as_slice() {
        return Err(Error::integrity(format!(
            "legacy item {} does not match its plaintext hash",
            m.id()
        )));
    }
    progress(written);
    Ok(written)
}

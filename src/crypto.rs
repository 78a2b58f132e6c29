//! Every cryptographic primitive the node uses, in one room.
//!
//! - [`Hash`](struct@Hash): SHA-256 digests, which name chunks, manifests and nodes.
//! - Chunk and metadata encryption: AES-256-GCM under a random per-item key,
//!   with a nonce that binds each chunk to its index and to whether it is the
//!   last one, so reordering, substitution and truncation all fail to decrypt.
//! - Envelopes: the item key wrapped for one recipient: in format 2 under a
//!   per-pair link key (`link`), in format 1 with RSA-OAEP-SHA256.
//! - Manifest signatures: RSA-PSS-SHA256 over a domain-separated message.
//!
//! Only public-key operations live here (wrapping, verifying). Private-key
//! operations (unwrapping, signing) belong to
//! [`Identity`](crate::identity::Identity). All RSA arithmetic runs on
//! aws-lc: its private-key operations are constant-time, where the `rsa`
//! crate's are not (RUSTSEC-2023-0071) and a peer can choose what a node
//! unwraps; and its public-key operations are about ten times faster, which
//! matters when a node re-keys or verifies thousands of manifests. The `rsa`
//! crate parses and encodes keys.
//! - Passphrase sealing (node keys, backups): scrypt then AES-256-GCM.
//!
//! The exact byte layouts are specified in docs/FORMAT.md.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PSS_2048_8192_SHA256};
use rand::RngCore;
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::RsaPublicKey;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

pub mod kem;
pub mod link;

/// A SHA-256 digest. Shown and parsed as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

/// Names a chunk: SHA-256 of its ciphertext.
pub(crate) type ChunkId = Hash;
/// Names an item: SHA-256 of its signed manifest body.
pub type ContentId = Hash;
/// Names a node: SHA-256 of its public key's SubjectPublicKeyInfo DER.
pub type NodeId = Hash;

impl Hash {
    /// SHA-256 of `data` on aws-lc (SHA-NI assembly), the implementation
    /// `openssl speed` measures: on the reference CPU it runs at openssl's rate,
    /// level with the `sha2` crate's SHA-NI path and never behind it
    /// (benches/hash.rs; docs/BENCHMARKS.md). Every chunk is hashed here (put,
    /// get, verify, serve, receive, backup), so this rate bounds them.
    pub fn of(data: &[u8]) -> Hash {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
        Hash(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub(crate) fn from_slice(b: &[u8]) -> Result<Hash> {
        let a: [u8; 32] = b.try_into().map_err(|_| {
            Error::invalid(format!("expected a 32-byte hash, got {} bytes", b.len()))
        })?;
        Ok(Hash(a))
    }
    /// Parse a hex id, naming `what` in the error ("content id", "node id", …).
    pub fn parse(s: &str, what: &str) -> Result<Hash> {
        let s = s.trim();
        let mut a = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut a).is_err() {
            return Err(Error::invalid(format!(
                "{what} {} is not 64 hex characters",
                crate::error::quote(s)
            )));
        }
        Ok(Hash(a))
    }
    /// The first 12 hex characters, for logs and tables.
    pub(crate) fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

/// Streaming SHA-256 on the same implementation as [`Hash::of`], for data
/// read in pieces (backup files, legacy items).
#[derive(Clone)]
pub struct Hasher(aws_lc_rs::digest::Context);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Hash {
        let d = self.0.finish();
        Hash(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher::new()
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}
impl FromStr for Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Hash> {
        Hash::parse(s, "id")
    }
}

/// A random AES-256 item key. Zeroed when dropped.
#[derive(Clone)]
pub struct ItemKey(Zeroizing<[u8; 32]>);

impl ItemKey {
    pub fn random() -> ItemKey {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        ItemKey(k)
    }
    pub fn from_bytes(b: &[u8]) -> Result<ItemKey> {
        let a: [u8; 32] = b.try_into().map_err(|_| {
            Error::integrity(format!("item key has {} bytes, expected 32", b.len()))
        })?;
        Ok(ItemKey(Zeroizing::new(a)))
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    fn cipher(&self) -> LessSafeKey {
        gcm_key(self.0.as_ref())
    }
}

impl fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ItemKey(..)")
    }
}

/// AES-256-GCM on aws-lc (AES-NI and CLMUL where the CPU has them).
/// Output layout: ciphertext then the 16-byte tag.
fn gcm_key(key: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 keys are 32 bytes"))
}

fn gcm_seal(key: &LessSafeKey, nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(plain.len() + 16);
    buf.extend_from_slice(plain);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("AES-GCM sealing of a bounded buffer cannot fail");
    buf
}

fn gcm_open(key: &LessSafeKey, nonce: [u8; 12], aad: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
    let mut buf = ct.to_vec();
    let n = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(n);
    Some(buf)
}

const DOMAIN_CHUNK: u8 = 0;
const DOMAIN_META: u8 = 1;
const CHUNK_AAD: &[u8] = b"bitsync-chunk-v1";
const META_AAD: &[u8] = b"bitsync-meta-v1";

/// The 96-bit nonce: domain byte, two zero bytes, the 64-bit big-endian index, the last-chunk flag.
fn nonce(domain: u8, index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = domain;
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n
}

/// Encrypt chunk `index` of an item; `last` marks the final chunk.
pub fn encrypt_chunk(key: &ItemKey, index: u64, last: bool, plain: &[u8]) -> Vec<u8> {
    gcm_seal(
        &key.cipher(),
        nonce(DOMAIN_CHUNK, index, last),
        CHUNK_AAD,
        plain,
    )
}

/// Decrypt chunk `index`; fails if the chunk was moved, swapped, truncated or altered.
pub fn decrypt_chunk(key: &ItemKey, index: u64, last: bool, ct: &[u8]) -> Result<Vec<u8>> {
    gcm_open(
        &key.cipher(),
        nonce(DOMAIN_CHUNK, index, last),
        CHUNK_AAD,
        ct,
    )
    .ok_or_else(|| {
        Error::integrity(format!(
            "chunk {index} does not decrypt: it was altered, reordered or the item was truncated"
        ))
    })
}

pub fn encrypt_meta(key: &ItemKey, plain: &[u8]) -> Vec<u8> {
    gcm_seal(&key.cipher(), nonce(DOMAIN_META, 0, true), META_AAD, plain)
}

/// Decrypt the manifest's metadata. Success also proves `key` is this item's key.
pub fn decrypt_meta(key: &ItemKey, ct: &[u8]) -> Result<Vec<u8>> {
    gcm_open(&key.cipher(), nonce(DOMAIN_META, 0, true), META_AAD, ct).ok_or_else(|| {
        Error::integrity("item metadata does not decrypt: wrong key or altered manifest")
    })
}

/// Wrap an item key for one recipient (RSA-OAEP, SHA-256 for hash and MGF1, no label):
/// a format-1 envelope, still written for Axon's legacy recipients and read everywhere.
pub fn wrap_key(recipient: &RsaPublicKey, key: &ItemKey) -> Vec<u8> {
    wrap_secret(recipient, key.as_bytes())
}

/// RSA-OAEP-SHA256 of a 32-byte secret (an item key, or a link secret).
fn wrap_secret(recipient: &RsaPublicKey, secret: &[u8]) -> Vec<u8> {
    let spki = recipient
        .to_public_key_der()
        .expect("an RSA public key always encodes");
    let public =
        PublicEncryptingKey::from_der(spki.as_bytes()).expect("a valid RSA public key loads");
    let oaep = OaepPublicEncryptingKey::new(public).expect("RSA keys support OAEP");
    let mut out = vec![0u8; oaep.ciphertext_size()];
    let n = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, secret, &mut out, None)
        .expect("RSA-OAEP of 32 bytes fits any key of 1024 bits or more")
        .len();
    out.truncate(n);
    out
}

/// The message a manifest signature covers: a domain prefix, then the body bytes.
pub fn signed_message(body: &[u8]) -> Vec<u8> {
    const SIGN_PREFIX: &[u8] = b"bitsync-manifest-v1\0";
    let mut m = Vec::with_capacity(SIGN_PREFIX.len() + body.len());
    m.extend_from_slice(SIGN_PREFIX);
    m.extend_from_slice(body);
    m
}

/// Check an RSA-PSS-SHA256 (salt 32 bytes) manifest signature. Signing is
/// [`Identity::sign_manifest`](crate::identity::Identity::sign_manifest).
pub(crate) fn verify_manifest(public: &RsaPublicKey, body: &[u8], signature: &[u8]) -> Result<()> {
    if verify_pss(public, &signed_message(body), signature) {
        return Ok(());
    }
    Err(Error::integrity(
        "manifest signature does not verify: the manifest was altered",
    ))
}

/// RSA-PSS-SHA256 (salt 32 bytes) of `message` under `public`.
fn verify_pss(public: &RsaPublicKey, message: &[u8], signature: &[u8]) -> bool {
    let Ok(pkcs1) = public.to_pkcs1_der() else {
        return false;
    };
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, pkcs1.as_bytes())
        .verify(message, signature)
        .is_ok()
}

// ---- passphrase sealing ----------------------------------------------------

const SEAL_MAGIC: &[u8; 4] = b"BSS1";
/// scrypt cost: 2^15 × 8 × 128 bytes = 32 MiB of memory per attempt.
const SCRYPT_LOG_N: u8 = 15;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;

fn seal_key(pass: &[u8], salt: &[u8], log_n: u8, r: u32, p: u32) -> Result<Zeroizing<[u8; 32]>> {
    let params = scrypt::Params::new(log_n, r, p, 32)
        .map_err(|e| Error::invalid(format!("sealed data has bad scrypt parameters: {e}")))?;
    let mut out = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(pass, salt, &params, out.as_mut())
        .map_err(|e| Error::invalid(format!("scrypt failed: {e}")))?;
    Ok(out)
}

/// The most memory an opened seal may make scrypt use (128 × r × N bytes):
/// 4× what [`seal`] writes (32 MiB).
const SCRYPT_MAX_MEM: u64 = 128 << 20;
/// The most work (N × r × p) an opened seal may ask for: 16× what [`seal`] writes.
const SCRYPT_MAX_WORK: u64 = 16 << (SCRYPT_LOG_N as u64 + 3);

/// Refuse scrypt parameters beyond what bitsync writes plus a margin,
/// before scrypt allocates anything: a crafted header (log_n 22, r 64, p 16)
/// would otherwise ask for 32 GiB and abort the process. bitsync never writes
/// such a header and the header is authenticated, so it is damaged or forged
/// data: `Integrity`, like a seal that is truncated.
fn check_scrypt_cost(log_n: u8, r: u32, p: u32) -> Result<()> {
    let ok = (1..=30).contains(&log_n) && r >= 1 && p >= 1 && {
        let n = 1u64 << log_n;
        let mem = (128 * n).saturating_mul(u64::from(r));
        let work = n.saturating_mul(u64::from(r)).saturating_mul(u64::from(p));
        mem <= SCRYPT_MAX_MEM && work <= SCRYPT_MAX_WORK
    };
    if ok {
        return Ok(());
    }
    Err(Error::integrity(format!(
        "sealed data asks for scrypt log_n={log_n}, r={r}, p={p}, beyond what bitsync writes \
         (15, 8, 1) and opens (at most {} MiB of memory and 16× the work); refused before running scrypt",
        SCRYPT_MAX_MEM >> 20
    )))
}

/// Seal `plain` under a passphrase: magic, scrypt parameters, salt, nonce, AES-256-GCM ciphertext.
pub(crate) fn seal(passphrase: &str, plain: &[u8]) -> Vec<u8> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut header = Vec::with_capacity(41);
    header.extend_from_slice(SEAL_MAGIC);
    header.push(SCRYPT_LOG_N);
    header.extend_from_slice(&SCRYPT_R.to_be_bytes());
    header.extend_from_slice(&SCRYPT_P.to_be_bytes());
    header.extend_from_slice(&salt);
    header.extend_from_slice(&nonce);
    let k = seal_key(
        passphrase.as_bytes(),
        &salt,
        SCRYPT_LOG_N,
        SCRYPT_R,
        SCRYPT_P,
    )
    .expect("constant parameters");
    let ct = gcm_seal(&gcm_key(k.as_ref()), nonce, &header, plain);
    header.extend_from_slice(&ct);
    header
}

pub(crate) fn is_sealed(data: &[u8]) -> bool {
    data.starts_with(SEAL_MAGIC)
}

/// The parts of sealed data, read and checked before any key is derived.
pub(crate) struct SealHeader<'a> {
    /// The 41 header bytes, authenticated as the ciphertext's associated data.
    header: &'a [u8],
    log_n: u8,
    r: u32,
    p: u32,
    ct: &'a [u8],
}

impl<'a> SealHeader<'a> {
    /// Split sealed data and refuse what is not bitsync-sealed or asks for
    /// more scrypt work than [`check_scrypt_cost`] allows, running no scrypt.
    pub(crate) fn parse(sealed: &'a [u8]) -> Result<SealHeader<'a>> {
        if sealed.len() < 41 + 16 || !is_sealed(sealed) {
            return Err(Error::integrity(
                "sealed data is truncated or not bitsync-sealed",
            ));
        }
        let (header, ct) = sealed.split_at(41);
        let log_n = header[4];
        let r = u32::from_be_bytes(header[5..9].try_into().expect("4-byte slice"));
        let p = u32::from_be_bytes(header[9..13].try_into().expect("4-byte slice"));
        check_scrypt_cost(log_n, r, p)?;
        Ok(SealHeader {
            header,
            log_n,
            r,
            p,
            ct,
        })
    }

    fn salt(&self) -> &[u8] {
        &self.header[13..29]
    }

    /// Decrypt with a key already derived from the passphrase.
    pub(crate) fn open_with(&self, key: &[u8; 32]) -> Result<Zeroizing<Vec<u8>>> {
        let n: [u8; 12] = self.header[29..41].try_into().expect("12-byte slice");
        let plain = gcm_open(&gcm_key(key), n, self.header, self.ct)
            .ok_or_else(|| Error::auth("wrong passphrase (or the sealed file was altered)"))?;
        Ok(Zeroizing::new(plain))
    }
}

/// Open sealed data; a wrong passphrase is an [`Kind::Auth`](crate::error::Kind::Auth) error.
pub(crate) fn unseal(passphrase: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let h = SealHeader::parse(sealed)?;
    let k = seal_key(passphrase.as_bytes(), h.salt(), h.log_n, h.r, h.p)?;
    h.open_with(&k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_binds_index_and_last_flag() {
        let k = ItemKey::random();
        let ct = encrypt_chunk(&k, 3, false, b"hello");
        assert_eq!(decrypt_chunk(&k, 3, false, &ct).unwrap(), b"hello");
        assert!(decrypt_chunk(&k, 4, false, &ct).is_err());
        assert!(decrypt_chunk(&k, 3, true, &ct).is_err());
        assert!(decrypt_chunk(&ItemKey::random(), 3, false, &ct).is_err());
    }

    #[test]
    fn seal_round_trip_and_wrong_passphrase() {
        let s = seal("correct horse", b"secret");
        assert_eq!(&unseal("correct horse", &s).unwrap()[..], b"secret");
        let e = unseal("wrong", &s).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Auth);
    }

    /// aws-lc's SHA-256 (one-shot and streamed in uneven pieces) against the
    /// `sha2` crate, across the block-boundary lengths.
    #[test]
    fn sha256_matches_the_sha2_crate() {
        use sha2::Digest;
        for n in [0usize, 1, 55, 56, 63, 64, 65, 1000, 1 << 20] {
            let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let want: [u8; 32] = sha2::Sha256::digest(&data).into();
            assert_eq!(Hash::of(&data).0, want, "one-shot, {n} bytes");
            let mut h = Hasher::new();
            for piece in data.chunks(7 + n / 3) {
                h.update(piece);
            }
            assert_eq!(h.finish().0, want, "streamed, {n} bytes");
        }
    }

    #[test]
    fn hash_parse_rejects_bad_hex() {
        assert!(Hash::parse("zz", "content id").is_err());
        let h = Hash::of(b"x");
        assert_eq!(Hash::parse(&h.to_hex(), "id").unwrap(), h);
    }
}

/// The nonce and sealing vectors of docs/FORMAT.md §9, read from the document
/// itself (tests/format_vectors.rs checks the rest through the public API).
#[cfg(test)]
mod format_vectors {
    use super::*;

    /// `name = value` of the ```` ```text ```` blocks of §9, continuation lines joined.
    fn vector(name: &str) -> String {
        const DOC: &str = include_str!("../docs/FORMAT.md");
        let section = &DOC[DOC
            .find("## 9. Known-answer test vectors")
            .expect("FORMAT.md has the test-vector section")..];
        let mut lines = section.lines().skip_while(|l| {
            l.split_once('=')
                .is_none_or(|(n, _)| n.trim() != name || l.starts_with(' '))
        });
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("FORMAT.md §9 has no {name}"));
        let mut v = first.split_once('=').unwrap().1.trim().to_string();
        for l in lines.take_while(|l| l.starts_with("    ")) {
            v.push_str(l.trim());
        }
        v
    }
    fn hex_of(name: &str) -> Vec<u8> {
        hex::decode(vector(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
    fn text_of(name: &str) -> String {
        vector(name).trim_matches('"').to_string()
    }

    #[test]
    fn nonces_are_the_documented_bytes() {
        assert_eq!(
            nonce(DOMAIN_CHUNK, 0, false).to_vec(),
            hex_of("chunk0_nonce")
        );
        assert_eq!(
            nonce(DOMAIN_CHUNK, 1, true).to_vec(),
            hex_of("chunk1_nonce")
        );
        assert_eq!(nonce(DOMAIN_CHUNK, 0, true).to_vec(), hex_of("empty_nonce"));
        assert_eq!(nonce(DOMAIN_META, 0, true).to_vec(), hex_of("meta_nonce"));
    }

    #[test]
    fn scrypt_costs_beyond_the_margin_are_refused_before_running() {
        assert!(check_scrypt_cost(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P).is_ok());
        assert!(check_scrypt_cost(17, 8, 1).is_ok()); // 128 MiB
        assert!(check_scrypt_cost(15, 8, 16).is_ok()); // 16× the work
        for (l, r, p) in [
            (22, 64, 16),
            (22, 8, 1),
            (18, 8, 1),
            (15, 8, 17),
            (0, 8, 1),
            (15, 0, 1),
            (15, 8, 0),
            (255, 1, 1),
            (15, u32::MAX, u32::MAX),
        ] {
            let e = check_scrypt_cost(l, r, p).unwrap_err();
            assert_eq!(e.kind(), crate::error::Kind::Integrity, "{l} {r} {p}");
        }
        // Through unseal, with the header rewritten: refused at once.
        let mut sealed = seal("pw", b"secret");
        sealed[4] = 22;
        sealed[5..9].copy_from_slice(&64u32.to_be_bytes());
        sealed[9..13].copy_from_slice(&16u32.to_be_bytes());
        let t = std::time::Instant::now();
        let e = unseal("pw", &sealed).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Integrity);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn sealed_vector_opens_with_the_documented_key() {
        let sealed = hex_of("sealed");
        let pass = text_of("seal_passphrase");
        let key = seal_key(
            pass.as_bytes(),
            &hex_of("seal_salt"),
            SCRYPT_LOG_N,
            SCRYPT_R,
            SCRYPT_P,
        )
        .unwrap();
        assert_eq!(key.to_vec(), hex_of("seal_key"));
        assert_eq!(
            &sealed[..13],
            &seal(&pass, b"")[..13],
            "the writer's header"
        );
        assert_eq!(
            &unseal(&pass, &sealed).unwrap()[..],
            text_of("seal_plaintext").as_bytes()
        );
        let mut bad = sealed.clone();
        bad[20] ^= 1; // a salt byte: authenticated as AAD
        assert!(unseal(&pass, &bad).is_err());
    }
}

//! The known-answer vectors of docs/FORMAT.md §9, checked against the code.
//!
//! The hex is read from FORMAT.md itself, so the document and the code cannot
//! drift apart: change a byte of either and this fails. The nonce and sealing
//! vectors, which need `crypto`'s private helpers, are checked by the unit
//! tests at the end of `src/crypto.rs` from the same section.
//!
//! The vectors were made with pyca/cryptography, not with bitsync, so these
//! tests are also a cross-check of the primitives against a second
//! implementation. `tests/python/format_vectors.py` is that second reader,
//! written from the document alone; it runs here too when `python3` has the
//! `cryptography` package.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use bitsync::content::{self, Output};
use bitsync::crypto::{self, Hash, ItemKey};
use bitsync::manifest::{Cipher, ItemMeta, Manifest, ManifestBody};
use bitsync::node::{self, Node};
use prost::Message;

const FORMAT_MD: &str = include_str!("../docs/FORMAT.md");
const SECTION: &str = "## 9. Known-answer test vectors";

/// The `name = value` lines of the ```` ```text ```` blocks of §9, values as
/// written (continuation lines joined, hex whitespace removed, quotes kept).
fn vectors() -> HashMap<String, String> {
    let start = FORMAT_MD
        .find(SECTION)
        .expect("FORMAT.md has the test-vector section");
    let body = &FORMAT_MD[start + SECTION.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut out: HashMap<String, String> = HashMap::new();
    let mut in_block = false;
    let mut last: Option<String> = None;
    for line in body.lines() {
        if line.starts_with("```") {
            in_block = !in_block && line.trim() == "```text";
            last = None;
            continue;
        }
        if !in_block || line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("    ") {
            let name = last.as_ref().expect("a continuation line follows a name");
            out.get_mut(name).unwrap().push_str(rest.trim());
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("FORMAT.md §9: not `name = value`: {line:?}"));
        let name = name.trim().to_string();
        assert!(
            out.insert(name.clone(), value.trim().to_string()).is_none(),
            "FORMAT.md §9 defines {name} twice"
        );
        last = Some(name);
    }
    out
}

struct Vectors(HashMap<String, String>);

impl Vectors {
    fn load() -> Vectors {
        Vectors(vectors())
    }
    fn raw(&self, name: &str) -> &str {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("FORMAT.md §9 has no {name}"))
    }
    fn hex(&self, name: &str) -> Vec<u8> {
        hex::decode(self.raw(name)).unwrap_or_else(|e| panic!("{name} is not hex: {e}"))
    }
    fn text(&self, name: &str) -> String {
        let v = self.raw(name);
        v.strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{name} is not a quoted string: {v}"))
            .to_string()
    }
    fn num(&self, name: &str) -> u64 {
        self.raw(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name} is not a number: {e}"))
    }
    fn hash(&self, name: &str) -> Hash {
        Hash::parse(self.raw(name), name).unwrap()
    }
    fn item_key(&self) -> ItemKey {
        ItemKey::from_bytes(&self.hex("item_key")).unwrap()
    }
    /// The plaintext of §9.1: byte `i` is `i mod 251`.
    fn plaintext(&self) -> Vec<u8> {
        let p: Vec<u8> = (0..self.num("plaintext_len"))
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(Hash::of(&p), self.hash("plaintext_sha256"));
        p
    }
    /// The test key as the PEM `node.key` file a data dir holds (FORMAT.md §1.1).
    fn key_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.hex("private_key_pkcs8"));
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem + "-----END PRIVATE KEY-----\n"
    }
}

/// AES-256-GCM straight from aws-lc with the document's nonce and AAD, to
/// check that the nonce the document states is the one the code uses.
fn gcm(key: &[u8], nonce: &[u8], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut buf = plain.to_vec();
    k.seal_in_place_append_tag(
        Nonce::try_assume_unique_for_key(nonce).unwrap(),
        Aad::from(aad),
        &mut buf,
    )
    .unwrap();
    buf
}

#[test]
fn chunks_encrypt_to_the_documented_bytes() {
    let v = Vectors::load();
    let key = v.item_key();
    let plain = v.plaintext();
    let cs = v.num("chunk_size") as usize;
    let (p0, p1) = plain.split_at(cs);

    let c0 = crypto::encrypt_chunk(&key, 0, false, p0);
    assert_eq!(c0.len(), cs + 16);
    assert_eq!(&c0[..16], v.hex("chunk0_head"));
    assert_eq!(&c0[c0.len() - 16..], v.hex("chunk0_tag"));
    assert_eq!(Hash::of(&c0), v.hash("chunk0_id"));
    let c1 = crypto::encrypt_chunk(&key, 1, true, p1);
    assert_eq!(c1, v.hex("chunk1_ciphertext"));
    assert_eq!(Hash::of(&c1), v.hash("chunk1_id"));
    let empty = crypto::encrypt_chunk(&key, 0, true, b"");
    assert_eq!(empty, v.hex("empty_ciphertext"));
    assert_eq!(Hash::of(&empty), v.hash("empty_id"));

    // The documented nonces and AAD give the same bytes.
    let k = key.as_bytes();
    assert_eq!(gcm(k, &v.hex("chunk0_nonce"), b"bitsync-chunk-v1", p0), c0);
    assert_eq!(gcm(k, &v.hex("chunk1_nonce"), b"bitsync-chunk-v1", p1), c1);
    assert_eq!(
        gcm(k, &v.hex("empty_nonce"), b"bitsync-chunk-v1", b""),
        empty
    );

    // And decryption binds the position: chunk 1 opens only as the last chunk 1.
    assert_eq!(crypto::decrypt_chunk(&key, 1, true, &c1).unwrap(), p1);
    assert!(crypto::decrypt_chunk(&key, 1, false, &c1).is_err());
    assert!(crypto::decrypt_chunk(&key, 0, true, &c1).is_err());
}

#[test]
fn metadata_encrypts_to_the_documented_bytes() {
    let v = Vectors::load();
    let key = v.item_key();
    let meta = ItemMeta {
        name: v.text("name"),
    }
    .encode_to_vec();
    assert_eq!(meta, v.hex("meta_plain"));
    let enc = crypto::encrypt_meta(&key, &meta);
    assert_eq!(enc, v.hex("encrypted_meta"));
    assert_eq!(
        gcm(
            key.as_bytes(),
            &v.hex("meta_nonce"),
            b"bitsync-meta-v1",
            &meta
        ),
        enc
    );
    assert_eq!(crypto::decrypt_meta(&key, &enc).unwrap(), meta);
    assert_eq!(
        crypto::encrypt_meta(&key, &ItemMeta::default().encode_to_vec()),
        v.hex("encrypted_meta_empty")
    );
}

#[test]
fn manifest_body_is_canonical_and_its_signature_verifies() {
    let v = Vectors::load();
    let body = ManifestBody {
        format_version: 1,
        publisher_key: v.hex("publisher_spki"),
        kind: v.text("kind"),
        size: v.num("plaintext_len"),
        chunk_size: v.num("chunk_size") as u32,
        chunk_ids: vec![v.hex("chunk0_id"), v.hex("chunk1_id")],
        created_at_ms: v.num("created_at_ms") as i64,
        encrypted_meta: v.hex("encrypted_meta"),
        cipher: Cipher::Aes256GcmChunked as i32,
        legacy_iv: Vec::new(),
        legacy_plain_sha256: Vec::new(),
    };
    let bytes = body.encode_to_vec();
    assert_eq!(
        bytes,
        v.hex("manifest_body"),
        "prost's encoding is the canonical one"
    );
    assert_eq!(Hash::of(&bytes), v.hash("content_id"));
    assert_eq!(Hash::of(&v.hex("publisher_spki")), v.hash("node_id"));

    let m =
        Manifest::from_signed(bytes.clone(), v.hex("signature")).expect("the signature verifies");
    assert_eq!(m.id(), v.hash("content_id"));
    assert_eq!(m.publisher(), v.hash("node_id"));
    let mut bad = v.hex("signature");
    bad[100] ^= 1;
    assert!(Manifest::from_signed(bytes.clone(), bad).is_err());
    let mut altered = bytes;
    *altered.last_mut().unwrap() ^= 1;
    assert!(Manifest::from_signed(altered, v.hex("signature")).is_err());
}

/// A data dir whose node key is the test key (§9.1).
fn node_with_test_key(v: &Vectors, root: &Path) -> Node {
    node::init(root, None).unwrap();
    fs::write(root.join("node.key"), v.key_pem()).unwrap();
    let db = rusqlite::Connection::open(root.join("bitsync.db")).unwrap();
    db.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'node_id'",
        [v.raw("node_id")],
    )
    .unwrap();
    drop(db);
    Node::open(root, &node::no_passphrase).unwrap()
}

/// The test key is a node key, its node id is the documented one, the
/// envelope opens to the item key, and the whole item, stored as the
/// document says, reads back through `get`.
#[test]
fn the_item_reads_back_with_the_test_key() {
    let v = Vectors::load();
    let tmp = tempfile::tempdir().unwrap();
    let n = node_with_test_key(&v, &tmp.path().join("data"));
    assert_eq!(n.identity().spki(), v.hex("publisher_spki"));
    assert_eq!(n.id(), v.hash("node_id"));
    let key = n.identity().unwrap_key(&v.hex("envelope")).unwrap();
    assert_eq!(key.as_bytes().as_slice(), v.hex("item_key"));

    let plain = v.plaintext();
    let cs = v.num("chunk_size") as usize;
    let chunks = [
        crypto::encrypt_chunk(&key, 0, false, &plain[..cs]),
        v.hex("chunk1_ciphertext"),
    ];
    let mut present = Vec::new();
    for c in &chunks {
        n.chunks().write(&Hash::of(c), c).unwrap();
        present.push((Hash::of(c), c.len() as u64));
    }
    n.chunks().sync().unwrap();
    let m = Manifest::from_signed(v.hex("manifest_body"), v.hex("signature")).unwrap();
    let envelopes = vec![(v.raw("node_id").to_string(), v.hex("envelope"))];
    n.db().insert_manifest(&m, &envelopes, &present).unwrap();

    let mut out = Vec::new();
    let (meta, size) = content::get(&n, &m.id(), Output::Stream(&mut out), &|_| {}).unwrap();
    assert_eq!(out, plain);
    assert_eq!(size, plain.len() as u64);
    assert_eq!(meta.name, v.text("name"));
}

/// The independent Python reader agrees, where `python3` has `cryptography`.
#[test]
fn python_reader_agrees() {
    let has_python = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        eprintln!("skipped: python3 with the cryptography package is not available");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/format_vectors.py"
    );
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md");
    let o = std::process::Command::new("python3")
        .args([script, doc])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "format_vectors.py failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

//! Writes realistic Axon BBS applet backups for tests.
//!
//! Included by tests with
//! `#[path = "support/axon_fixture.rs"] mod axon_fixture;`.
//!
//! This is an independent writer: it does not use the reader under test for
//! anything. It lays files out the way Axon's `manage.py backup_applets` does
//! and encrypts the way Axon's `BitSyncService.create_encrypted_content` does:
//! AES-256-CBC with PKCS7 over the whole plaintext, the ciphertext cut into
//! `chunk_size` pieces, SHA-256 hex of each piece, base64 IV, the AES key
//! wrapped with RSA-OAEP-SHA256 per recipient under the MD5 of the
//! recipient's SubjectPublicKeyInfo PEM (assembled here by hand from the DER),
//! and JSON written like Python's `json.dump(indent=2)` with its default
//! `ensure_ascii` (non-ASCII escaped as `\uXXXX`).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use aes::Aes256;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockEncryptMut, KeyIvInit};
use md5::Md5;
use rand::RngCore;
use rsa::pkcs8::EncodePublicKey;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Axon's `CHUNK_SIZE` (256 KiB).
pub const AXON_CHUNK_SIZE: usize = 262_144;
/// The `backup_date` every fixture writes.
pub const BACKUP_DATE: &str = "20250314_092653";

/// An RSA-2048 key generated once per test binary (key generation is slow).
pub fn shared_key() -> RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("generate RSA key"))
        .clone()
}

/// A second RSA-2048 key, for "wrong key" and "other recipient" cases.
pub fn other_key() -> RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("generate RSA key"))
        .clone()
}

/// Axon's folder name for an applet (`applet.name.replace('/', '_').replace(' ', '_')`).
pub fn folder_for(applet: &str) -> String {
    applet
        .chars()
        .map(|c| if c == '/' || c == ' ' { '_' } else { c })
        .collect()
}

/// The key id Axon's `generate_checksum` gives a public key: MD5 hex of the
/// SPKI PEM, stripped. The PEM is assembled here from the DER so as not to
/// share the reader's PEM encoder.
pub fn axon_key_id(public_key: &RsaPublicKey) -> String {
    let der = public_key.to_public_key_der().expect("SPKI DER");
    let b64 = B64.encode(der.as_bytes());
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    hex::encode(Md5::digest(pem.trim().as_bytes()))
}

/// The PEM an Axon database would hold for a public key (as `author_pubkey`, `owner_pubkey`).
fn pubkey_pem(public_key: &RsaPublicKey) -> String {
    public_key
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .expect("SPKI PEM")
}

/// Deterministic, non-repeating test content of `len` bytes.
pub fn content(seed: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in seed.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct DataSpec {
    user: String,
    content: Vec<u8>,
}

struct AppletSpec {
    name: String,
    code: Vec<u8>,
    data: Vec<DataSpec>,
}

/// Describes a backup, then [`Builder::write`]s it.
pub struct Builder {
    key: RsaPrivateKey,
    extra_recipients: Vec<RsaPublicKey>,
    applets: Vec<AppletSpec>,
    chunk_size: usize,
    manifests_as_strings: bool,
    extra_fields: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// Encrypts to [`shared_key`], Axon's chunk size, manifests as JSON objects.
    pub fn new() -> Self {
        Builder {
            key: shared_key(),
            extra_recipients: Vec::new(),
            applets: Vec::new(),
            chunk_size: AXON_CHUNK_SIZE,
            manifests_as_strings: false,
            extra_fields: false,
        }
    }

    /// Encrypt to this key instead of [`shared_key`].
    pub fn key(mut self, key: RsaPrivateKey) -> Self {
        self.key = key;
        self
    }

    /// Also wrap every AES key for this public key (Axon wraps for itself and
    /// each trusted peer).
    pub fn extra_recipient(mut self, public_key: RsaPublicKey) -> Self {
        self.extra_recipients.push(public_key);
        self
    }

    /// An applet whose code is `code_len` bytes of [`content`].
    pub fn applet(self, name: &str, code_len: usize) -> Self {
        let code = content(name, code_len);
        self.applet_with_code(name, code)
    }

    pub fn applet_with_code(mut self, name: &str, code: Vec<u8>) -> Self {
        self.applets.push(AppletSpec {
            name: name.to_owned(),
            code,
            data: Vec::new(),
        });
        self
    }

    /// A data instance of `len` bytes owned by `user`, for an applet added before.
    pub fn data(mut self, applet: &str, user: &str, len: usize) -> Self {
        let spec = self
            .applets
            .iter_mut()
            .find(|a| a.name == applet)
            .expect("data() for an applet not added");
        spec.data.push(DataSpec {
            user: user.to_owned(),
            content: content(&format!("{applet}\0{user}"), len),
        });
        self
    }

    /// Piece size written in every manifest (default Axon's 262144).
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.chunk_size = n;
        self
    }

    /// Write `code_manifest` / `data_manifest` as JSON strings holding the
    /// manifest, as a double-encoded Django JSONField comes out.
    pub fn manifests_as_strings(mut self, yes: bool) -> Self {
        self.manifests_as_strings = yes;
        self
    }

    /// Add unknown fields everywhere (backup manifest, metadata, manifests,
    /// data entries), as a later Axon version might.
    pub fn extra_fields(mut self, yes: bool) -> Self {
        self.extra_fields = yes;
        self
    }

    /// Writes the backup into `dir` (created if needed) and says what it holds.
    pub fn write(self, dir: &Path) -> Written {
        fs::create_dir_all(dir).unwrap();
        let mut recipients = vec![self.key.to_public_key()];
        recipients.extend(self.extra_recipients.iter().cloned());
        let author_pem = pubkey_pem(&self.key.to_public_key());

        let mut items = Vec::new();
        let (mut total_chunks, mut total_data, mut total_scores) = (0usize, 0usize, 0usize);
        for (a, applet) in self.applets.iter().enumerate() {
            let adir = dir.join(folder_for(&applet.name));
            fs::create_dir_all(&adir).unwrap();

            let code = self.encrypt(&applet.code, &recipients, &adir.join("chunks"));
            total_chunks += code.chunk_paths.len();
            let mut metadata = json!({
                "id": uuid_like(&format!("applet {a}")),
                "name": applet.name,
                "description": format!("The {} applet", applet.name),
                "author_pubkey": author_pem,
                "code_manifest": self.manifest_field(&code.manifest),
                "parameters": {"width": 800, "height": 600},
                "is_local": true,
                "created_at": "2025-01-02T03:04:05.123456+00:00",
                "category": if a % 2 == 0 { Value::from("Games") } else { Value::Null },
                "is_debug_mode": false,
                "event_board": Value::Null,
                "handles_mime_types": "",
            });
            if self.extra_fields {
                metadata["axon_future_field"] = json!({"nested": [1, 2, 3]});
                metadata["signature"] = json!("c2lnbmF0dXJl");
            }
            write_json(&adir.join("metadata.json"), &metadata);
            items.push(WrittenItem {
                applet: applet.name.clone(),
                owner: None,
                instance_id: None,
                plaintext: applet.code.clone(),
                aes_key: code.aes_key,
                chunk_paths: code.chunk_paths,
            });

            if !applet.data.is_empty() {
                let mut list = Vec::new();
                for (d, data) in applet.data.iter().enumerate() {
                    let enc = self.encrypt(
                        &data.content,
                        &recipients,
                        &adir.join("data_chunks").join(&data.user),
                    );
                    let id = uuid_like(&format!("data {a} {d}"));
                    let mut entry = json!({
                        "id": id,
                        "owner_username": data.user,
                        "owner_pubkey": author_pem,
                        "data_manifest": self.manifest_field(&enc.manifest),
                        "last_updated": "2025-03-01T10:20:30.000001+00:00",
                    });
                    if self.extra_fields {
                        entry["axon_future_field"] = json!(true);
                    }
                    list.push(entry);
                    items.push(WrittenItem {
                        applet: applet.name.clone(),
                        owner: Some(data.user.clone()),
                        instance_id: Some(id),
                        plaintext: data.content.clone(),
                        aes_key: enc.aes_key,
                        chunk_paths: enc.chunk_paths,
                    });
                }
                total_data += list.len();
                write_json(&adir.join("applet_data.json"), &Value::Array(list));
            }

            // Files the reader does not use, present as in a real backup.
            let scores = json!([{
                "owner_pubkey": author_pem, "owner_nickname": "alice", "score": 1200,
                "wins": 3, "losses": 1, "kills": null, "deaths": null, "assists": null,
                "last_updated": "2025-03-01T10:20:30+00:00",
            }]);
            total_scores += 1;
            write_json(&adir.join("high_scores.json"), &scores);
            write_json(
                &adir.join("shared_state.json"),
                &json!({"state_data": {"turn": "white"}, "version": 7, "last_updated": "2025-03-01T10:20:30+00:00"}),
            );
        }

        let mut manifest = json!({
            "backup_date": BACKUP_DATE,
            "total_applets": self.applets.len(),
            "total_chunks": total_chunks,
            "total_data_instances": total_data,
            "total_high_scores": total_scores,
            "applets": self.applets.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
        });
        if self.extra_fields {
            manifest["format_version"] = json!(2);
        }
        write_json(&dir.join("backup_manifest.json"), &manifest);

        Written {
            dir: dir.to_path_buf(),
            key: self.key,
            items,
        }
    }

    fn manifest_field(&self, manifest: &Value) -> Value {
        let mut manifest = manifest.clone();
        if self.extra_fields {
            manifest["compression"] = json!("none");
        }
        if self.manifests_as_strings {
            Value::String(manifest.to_string())
        } else {
            manifest
        }
    }

    fn encrypt(
        &self,
        plaintext: &[u8],
        recipients: &[RsaPublicKey],
        chunk_dir: &Path,
    ) -> Encrypted {
        let mut rng = rand::thread_rng();
        let mut aes_key = [0u8; 32];
        let mut iv = [0u8; 16];
        rng.fill_bytes(&mut aes_key);
        rng.fill_bytes(&mut iv);
        let ciphertext = cbc::Encryptor::<Aes256>::new(&aes_key.into(), &iv.into())
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext);

        fs::create_dir_all(chunk_dir).unwrap();
        let mut chunk_hashes = Vec::new();
        let mut chunk_paths = Vec::new();
        for (i, piece) in ciphertext.chunks(self.chunk_size).enumerate() {
            let path = chunk_dir.join(format!("{i}.chunk"));
            fs::write(&path, piece).unwrap();
            chunk_hashes.push(hex::encode(Sha256::digest(piece)));
            chunk_paths.push(path);
        }

        let mut envelopes = serde_json::Map::new();
        for pk in recipients {
            let wrapped = pk
                .encrypt(&mut rng, Oaep::new::<Sha256>(), &aes_key)
                .expect("OAEP wrap");
            envelopes.insert(axon_key_id(pk), Value::from(B64.encode(wrapped)));
        }
        let manifest = json!({
            "content_hash": hex::encode(Sha256::digest(plaintext)),
            "chunk_size": self.chunk_size,
            "chunk_hashes": chunk_hashes,
            "encryption_iv": B64.encode(iv),
            "encrypted_aes_keys": envelopes,
        });
        Encrypted {
            manifest,
            aes_key,
            chunk_paths,
        }
    }
}

struct Encrypted {
    manifest: Value,
    aes_key: [u8; 32],
    chunk_paths: Vec<PathBuf>,
}

/// What [`Builder::write`] wrote.
pub struct Written {
    pub dir: PathBuf,
    /// The key every item is encrypted to.
    pub key: RsaPrivateKey,
    /// In the order the reader should list them: each applet's code, then its data.
    pub items: Vec<WrittenItem>,
}

pub struct WrittenItem {
    pub applet: String,
    /// `None` for applet code.
    pub owner: Option<String>,
    pub instance_id: Option<String>,
    pub plaintext: Vec<u8>,
    pub aes_key: [u8; 32],
    pub chunk_paths: Vec<PathBuf>,
}

impl Written {
    /// The code item of `applet` (`owner` `None`) or its data for `owner`.
    pub fn item(&self, applet: &str, owner: Option<&str>) -> &WrittenItem {
        self.items
            .iter()
            .find(|i| i.applet == applet && i.owner.as_deref() == owner)
            .unwrap_or_else(|| panic!("no fixture item {applet:?} / {owner:?}"))
    }

    pub fn metadata_path(&self, applet: &str) -> PathBuf {
        self.dir.join(folder_for(applet)).join("metadata.json")
    }

    pub fn applet_data_path(&self, applet: &str) -> PathBuf {
        self.dir.join(folder_for(applet)).join("applet_data.json")
    }

    pub fn backup_manifest_path(&self) -> PathBuf {
        self.dir.join("backup_manifest.json")
    }
}

/// Flips every bit of the byte in the middle of a piece.
pub fn corrupt_piece(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    fs::write(path, bytes).unwrap();
}

/// Cuts the last `drop` bytes off a piece.
pub fn truncate_piece(path: &Path, drop: usize) {
    let bytes = fs::read(path).unwrap();
    fs::write(path, &bytes[..bytes.len() - drop]).unwrap();
}

pub fn delete_piece(path: &Path) {
    fs::remove_file(path).unwrap();
}

/// Rewrites a JSON file after `edit` changes it.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    write_json(path, &value);
}

/// Like Python's `json.dump(value, f, indent=2)`: two-space indent, non-ASCII
/// escaped as `\uXXXX` (UTF-16 surrogate pairs beyond the BMP).
fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap();
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            ascii.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                ascii.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    fs::write(path, ascii).unwrap();
}

/// A UUID-shaped id derived from `seed`.
fn uuid_like(seed: &str) -> String {
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Replace `path` (removed if present) with a FIFO: opening it to read waits
/// for a writer that never comes.
pub fn make_fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let _ = fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other effect.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Replace `path` (removed if present) with a symbolic link to `target`.
pub fn make_symlink(target: &Path, path: &Path) {
    if path.is_dir() && !path.is_symlink() {
        fs::remove_dir_all(path).unwrap();
    } else {
        let _ = fs::remove_file(path);
    }
    std::os::unix::fs::symlink(target, path).unwrap();
}

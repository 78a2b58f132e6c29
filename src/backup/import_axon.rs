//! `bitsync import-axon`: an Axon BBS applet backup into this node.
//!
//! Every Axon item (an applet's code, one user's data for an applet) whose
//! pieces are all present and hash-correct is kept **as it is**: a
//! `CIPHER_AXON_AES256_CBC` manifest signed by this node lists Axon's pieces
//! as its chunks (Axon names a piece by the SHA-256 of its ciphertext, which
//! is exactly a bitsync chunk id), the pieces are stored unchanged, and Axon's
//! key envelopes are stored with recipients `axon:<key id>`. Such items are
//! listed, verified, backed up and their chunks served like any other.
//!
//! With the Axon instance's RSA private key (`--axon-key`), each item is also
//! decrypted (every piece hash, the CBC padding and Axon's `content_hash`
//! checked) into a private temporary file, re-published as a native item
//! (`content::put`), and the legacy item gets an envelope for this node, so
//! `bitsync get` works on both. The legacy manifest then also carries the
//! exact plaintext size and the item's name encrypted under its key (what the
//! rest of bitsync uses to check a key), which makes it re-keyable for peers.
//! Without the key the plaintext size is unknown (the padding is encrypted):
//! the manifest records the largest size the ciphertext can hold
//! (ciphertext length − 1) and no metadata.
//!
//! Items with a missing or corrupt piece are reported and not imported; the
//! command exits non-zero at the end if any item was skipped. Re-running is
//! idempotent: manifest bodies are deterministic (the same chunks, sizes,
//! times and — for a given key — the same encrypted name), so a second run
//! finds every item already stored, and the native copy of each legacy item is
//! remembered in the settings table (`axon_import.native.<legacy id>`), so it
//! is not published twice.

use std::fs;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use prost::Message;
use rsa::RsaPrivateKey;
use zeroize::Zeroizing;

use crate::axon::{self, AxonItem, AxonItemKind, ChunkState};
use crate::crypto::{self, ChunkId, ContentId, Hash, ItemKey};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Cipher, ItemMeta, Manifest, ManifestBody};
use crate::node::Node;

/// What happened to one Axon item.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    Imported {
        legacy: Option<ContentId>,
        native: Option<ContentId>,
        /// Nothing new was stored: an earlier run imported it.
        already: bool,
        /// Something worth telling (e.g. the key did not open this item).
        note: Option<String>,
    },
    /// Some pieces are missing or damaged: not imported.
    Incomplete { problems: Vec<String> },
    /// The item could not be imported for another reason.
    Failed { reason: String },
}

#[derive(Debug, Clone)]
pub(crate) struct ItemReport {
    pub(crate) applet: String,
    pub(crate) kind: AxonItemKind,
    pub(crate) status: Status,
}

#[derive(Debug, Clone)]
pub(crate) struct ImportReport {
    pub(crate) backup_date: String,
    pub(crate) items: Vec<ItemReport>,
}

impl ImportReport {
    pub(crate) fn skipped(&self) -> usize {
        self.items
            .iter()
            .filter(|i| !matches!(i.status, Status::Imported { .. }))
            .count()
    }
}

/// Load the Axon instance's RSA private key (PKCS#8 or PKCS#1 PEM, unencrypted).
pub(crate) fn load_axon_key(path: &Path) -> Result<RsaPrivateKey> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    let text =
        Zeroizing::new(fs::read_to_string(path).ctx(format!("Axon key {}", path.display()))?);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(Error::invalid(format!(
            "Axon key {} is passphrase-protected; give the key file Axon itself reads (unencrypted PEM)",
            path.display()
        )));
    }
    RsaPrivateKey::from_pkcs8_pem(&text)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(&text))
        .map_err(|_| {
            Error::invalid(format!(
                "Axon key {} is not an RSA private key in PEM (PKCS#8 or PKCS#1)",
                path.display()
            ))
        })
}

fn kind_of(item: &AxonItem) -> &'static str {
    match item.kind {
        AxonItemKind::AppletCode => "applet",
        AxonItemKind::AppletData { .. } => "applet-data",
    }
}

fn name_of(item: &AxonItem) -> String {
    match &item.kind {
        AxonItemKind::AppletCode => item.applet.clone(),
        AxonItemKind::AppletData {
            instance_id,
            owner_username,
        } => {
            format!("{} (data of {owner_username}, {instance_id})", item.applet)
        }
    }
}

/// Milliseconds since the epoch of an ISO 8601 / RFC 3339 time as Axon
/// (Django) writes it: `2025-01-02T03:04:05.123456+00:00`, `...Z`, or no zone (UTC).
pub(crate) fn parse_axon_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() {
            return None;
        }
        let ms: String = digits
            .chars()
            .chain(std::iter::repeat('0'))
            .take(3)
            .collect();
        millis = ms.parse().ok()?;
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let r = &rest[1..];
            // `get`, not indexing: the zone is outside input and may cut a
            // multi-byte character (`+1é1` is four bytes).
            let two = |at: usize| r.get(at..at + 2)?.parse::<i64>().ok();
            let (oh, om) = match r.len() {
                5 if r.as_bytes()[2] == b':' => (two(0)?, two(3)?),
                4 => (two(0)?, two(2)?),
                2 => (two(0)?, 0),
                _ => return None,
            };
            sign * (oh * 60 + om)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// Import every item of the Axon backup at `dir`. Errors only when the
/// backup cannot be read at all; per-item problems are in the report.
pub(crate) fn import(
    node: &Node,
    dir: &Path,
    axon_key: Option<&RsaPrivateKey>,
    progress: &dyn Fn(&str),
) -> Result<ImportReport> {
    let backup = axon::open(dir).map_err(|e| {
        let kind = match &e {
            axon::AxonError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                crate::error::Kind::NotFound
            }
            axon::AxonError::Io { .. } => crate::error::Kind::Io,
            _ => crate::error::Kind::Invalid,
        };
        Error::new(
            kind,
            format!("{} is not a readable Axon backup: {e}", dir.display()),
        )
    })?;
    let mut items = Vec::with_capacity(backup.items.len());
    for item in &backup.items {
        progress(&item.label());
        let status = match import_item(node, item, axon_key) {
            Ok(s) => s,
            Err(e) => Status::Failed {
                reason: e.to_string(),
            },
        };
        items.push(ItemReport {
            applet: item.applet.clone(),
            kind: item.kind.clone(),
            status,
        });
    }
    Ok(ImportReport {
        backup_date: backup.backup_date,
        items,
    })
}

fn import_item(node: &Node, item: &AxonItem, axon_key: Option<&RsaPrivateKey>) -> Result<Status> {
    // 1. Every piece present and hash-correct, or nothing of it is imported.
    let problems = piece_problems(item)?;
    if !problems.is_empty() {
        return Ok(Status::Incomplete { problems });
    }
    let mut ct_len = 0u64;
    for p in &item.chunk_paths {
        // Not followed: check_item found each a regular file inside the backup.
        ct_len += fs::symlink_metadata(p)
            .ctx(format!("piece {}", p.display()))?
            .len();
    }

    // 2. With the Axon key: the item key and the verified plaintext, in a private temp file.
    let mut note = None;
    let mut key: Option<Zeroizing<[u8; 32]>> = None;
    if let Some(k) = axon_key {
        match axon::unwrap_key(item, k) {
            Ok(aes) => key = Some(aes),
            Err(e) => {
                note = Some(format!(
                    "not decrypted: {e}; kept in its original cipher only"
                ))
            }
        }
    }
    let plain = match &key {
        Some(k) => match Plaintext::decrypt(node, item, k) {
            Ok(p) => Some(p),
            Err(e) => {
                return Ok(Status::Incomplete {
                    problems: vec![e.to_string()],
                })
            }
        },
        None => None,
    };

    // 3. The legacy item: Axon's pieces as chunks, under a manifest signed by this node.
    let cs = item.manifest.chunk_size;
    let legacy_ok =
        cs % 16 == 0 && cs <= manifest::MAX_CHUNK_SIZE && ct_len % 16 == 0 && ct_len > 0;
    let mut legacy_id = None;
    let mut already = true;
    if legacy_ok {
        let item_key = key
            .as_ref()
            .map(|k| ItemKey::from_bytes(&k[..]))
            .transpose()?;
        let size = plain.as_ref().map(|p| p.len).unwrap_or(ct_len - 1);
        let (id, changed) = import_legacy(node, item, item_key.as_ref(), size)?;
        already &= !changed;
        legacy_id = Some(id);
    } else if plain.is_none() {
        return Ok(Status::Failed {
            reason: format!(
                "its pieces ({cs} bytes, {ct_len} in all) cannot be kept in Axon's cipher (bitsync needs a multiple of 16 up to {}); \
                 import it with --axon-key to re-publish it as a native item",
                manifest::MAX_CHUNK_SIZE
            ),
        });
    }

    // 4. The native copy, published once.
    let mut native = None;
    if let Some(p) = plain {
        let (id, new) = publish_native(node, item, p, legacy_id)?;
        already &= !new;
        native = Some(id);
    }
    Ok(Status::Imported {
        legacy: legacy_id,
        native,
        already,
        note,
    })
}

/// What is wrong with the item's pieces on disk (nothing: an empty list).
fn piece_problems(item: &AxonItem) -> Result<Vec<String>> {
    let states = axon::check_item(item).map_err(|e| Error::io(e.to_string()))?;
    let mut problems = Vec::new();
    for (i, st) in states.iter().enumerate() {
        let p = item.chunk_paths[i].display();
        match st {
            ChunkState::Ok => {}
            ChunkState::Missing => problems.push(format!("piece {i} is missing ({p})")),
            ChunkState::Corrupt { reason } => {
                problems.push(format!("piece {i} is corrupt ({p}): {reason}"))
            }
        }
    }
    if item.chunk_paths.is_empty() {
        problems.push("the manifest lists no pieces".into());
    }
    Ok(problems)
}

/// Store the item in Axon's cipher: its pieces as chunks, its envelopes
/// (Axon's, and this node's when the key is known), under a manifest this
/// node signs. Returns the content id and whether anything changed.
fn import_legacy(
    node: &Node,
    item: &AxonItem,
    item_key: Option<&ItemKey>,
    size: u64,
) -> Result<(ContentId, bool)> {
    let encrypted_meta = match item_key {
        Some(k) => crypto::encrypt_meta(
            k,
            &ItemMeta {
                name: name_of(item),
            }
            .encode_to_vec(),
        ),
        None => Vec::new(),
    };
    let body = ManifestBody {
        format_version: manifest::FORMAT_VERSION,
        publisher_key: node.identity.spki().to_vec(),
        kind: kind_of(item).to_string(),
        size,
        chunk_size: item.manifest.chunk_size,
        chunk_ids: item
            .manifest
            .chunk_hashes
            .iter()
            .map(|h| h.to_vec())
            .collect(),
        created_at_ms: item
            .created_at
            .as_deref()
            .and_then(parse_axon_time)
            .unwrap_or(0),
        encrypted_meta,
        cipher: Cipher::AxonAes256Cbc as i32,
        legacy_iv: item.manifest.iv.to_vec(),
        legacy_plain_sha256: item.manifest.content_hash.to_vec(),
    };
    let m = Manifest::create(&node.identity, body)
        .map_err(|e| e.context("cannot be described as a legacy item"))?;
    let present = store_pieces(node, item, &m)?;
    let mut envelopes: Vec<(String, Vec<u8>)> = item
        .manifest
        .encrypted_aes_keys
        .iter()
        .map(|(kid, w)| (format!("axon:{kid}"), w.clone()))
        .collect();
    if let Some(k) = item_key {
        if node.db.envelope(&m.id(), &node.id().to_hex())?.is_none() {
            envelopes.push((node.id().to_hex(), node.wrap_own(&m.id(), k)?));
        }
    }
    let changed = node.db.insert_manifest(&m, &envelopes, &present)?.is_some();
    Ok((m.id(), changed))
}

/// Axon's pieces written as this node's chunks (those not present yet), synced.
fn store_pieces(node: &Node, item: &AxonItem, m: &Manifest) -> Result<Vec<(ChunkId, u64)>> {
    let mut present = Vec::with_capacity(item.chunk_paths.len());
    let mut wrote = false;
    for (i, path) in item.chunk_paths.iter().enumerate() {
        let id = m.chunk_id(i);
        let len = m.chunk_len(i);
        if !node.db.has_chunk(&id)? {
            // Checked again as read (the file may have changed since check_item).
            let data = axon::read_piece(item, i).map_err(|e| Error::integrity(e.to_string()))?;
            node.chunks
                .write(&id, &data)
                .map_err(|e| e.context(format!("piece {i} ({})", path.display())))?;
            wrote = true;
        }
        present.push((id, len));
    }
    if wrote {
        node.chunks.sync()?;
    }
    Ok(present)
}

/// The decrypted item as a native item, unless an earlier import of the
/// same legacy item already published it. Returns its id and whether it is new.
fn publish_native(
    node: &Node,
    item: &AxonItem,
    mut p: Plaintext,
    legacy_id: Option<ContentId>,
) -> Result<(ContentId, bool)> {
    let marker = legacy_id.map(|id| format!("axon_import.native.{id}"));
    let known = match &marker {
        Some(k) => node
            .db
            .setting(k)?
            .and_then(|v| Hash::parse(&v, "content id").ok()),
        None => None,
    };
    if let Some(id) = known {
        if node.db.has_manifest(&id)? {
            return Ok((id, false));
        }
    }
    let opts = crate::content::PutOptions {
        kind: kind_of(item).to_string(),
        name: name_of(item),
    };
    p.file.rewind().ctx("rewinding the decrypted item")?;
    let id = crate::content::put(node, &mut p.file, &opts, &|_| {})?;
    if let Some(k) = &marker {
        node.db.set_setting(k, &id.to_hex())?;
    }
    Ok((id, true))
}

/// A verified plaintext in a private temporary file, removed when dropped.
struct Plaintext {
    file: fs::File,
    path: std::path::PathBuf,
    len: u64,
}

impl Plaintext {
    fn decrypt(node: &Node, item: &AxonItem, key: &[u8; 32]) -> Result<Plaintext> {
        let path = node
            .paths
            .root
            .join(format!(".axon-import-{}.tmp", std::process::id()));
        let _ = fs::remove_file(&path);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .ctx(format!("creating {}", path.display()))?;
        let mut p = Plaintext { file, path, len: 0 };
        let mut w = BufWriter::with_capacity(1 << 20, &p.file);
        let n =
            axon::decrypt_item(item, key, &mut w).map_err(|e| Error::integrity(e.to_string()))?;
        w.flush().ctx("writing the decrypted item")?;
        drop(w);
        p.len = n;
        Ok(p)
    }
}

impl Drop for Plaintext {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_axon_time;

    #[test]
    fn axon_times_parse() {
        assert_eq!(parse_axon_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_axon_time("1970-01-01T00:00:01.5+00:00"), Some(1500));
        assert_eq!(
            parse_axon_time("2025-01-02T03:04:05.123456+00:00"),
            Some(1_735_787_045_123)
        );
        assert_eq!(
            parse_axon_time("2025-01-02T05:04:05+02:00"),
            Some(1_735_787_045_000)
        );
        assert_eq!(
            parse_axon_time("2025-01-02 03:04:05"),
            Some(1_735_787_045_000)
        );
        assert_eq!(parse_axon_time("yesterday"), None);
        assert_eq!(parse_axon_time("2025-13-02T03:04:05Z"), None);
    }

    /// Found while writing the axon_json fuzz target: a zone whose digits are cut by a
    /// multi-byte character panicked (byte index 2 is not a char boundary).
    #[test]
    fn a_zone_with_a_multibyte_character_is_refused_not_a_panic() {
        assert_eq!(parse_axon_time("2025-01-02T03:04:05+1é1"), None);
        assert_eq!(parse_axon_time("2025-01-02T03:04:05-é"), None);
        assert_eq!(parse_axon_time("2025-01-02T03:04:05+é:0"), None);
        assert_eq!(
            parse_axon_time("2025-01-02T05:04:05+0200"),
            Some(1_735_787_045_000)
        );
    }
}

//! Items in and out of the store: publish (`put`), read back (`get`), audit (`verify`).
//!
//! Both directions stream chunks through a bounded pipeline
//! ([`pipeline::ordered`]): the calling thread reads and writes in order,
//! worker threads hash and encrypt/decrypt a few chunks at once, so every core
//! works and memory stays at a few chunks whatever the item's size. `get` checks the manifest signature and
//! unwraps the key before writing a byte, verifies each chunk's hash and GCM
//! tag as it goes, and writes a file output atomically: a tampered item
//! leaves no output file behind.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

mod list;
pub mod migrate;
pub mod scrub;

pub use list::{list, Listed};

use crate::chunks::pipeline;
use crate::crypto::{self, ChunkId, ContentId, ItemKey};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Cipher, ItemMeta, Manifest};
use crate::node::Node;

/// Chunks written between two syncs of the chunk dir during `put`.
const SYNC_EVERY: usize = 64;
/// Hash checks `verify` records per database transaction.
const CHECKS_BATCH: usize = 1024;

pub struct PutOptions {
    pub kind: String,
    pub name: String,
}

/// Read `input` to the end and publish it as a new item. Returns its content id.
pub fn put(
    node: &Node,
    input: &mut dyn Read,
    opts: &PutOptions,
    progress: &dyn Fn(u64),
) -> Result<ContentId> {
    if opts.kind.is_empty() || opts.kind.len() > 64 {
        return Err(Error::invalid("kind must be 1 to 64 characters"));
    }
    let chunk_size = node.config.chunk_size as usize;
    let key = ItemKey::random();
    let mut ids = Vec::new();
    let mut present = Vec::new();
    let mut checks = Vec::new();
    let mut size = 0u64;
    let (workers, depth) = pipeline::shape(&node.chunks);
    // Chunk files are written by the workers; none is recorded as present
    // before the sync below (and the manifest row) make them durable.
    pipeline::ordered(
        InputChunks::new(input, chunk_size),
        workers,
        depth,
        |(index, last, plain): (u64, bool, Vec<u8>)| {
            let ct = crypto::encrypt_chunk(&key, index, last, &plain);
            let len = plain.len() as u64;
            drop(plain);
            let written = node.chunks.write_new(&ct);
            written.map(|(id, stamp)| (id, stamp, ct.len() as u64, len))
        },
        |written| {
            let (id, stamp, ct_len, plain_len) = written?;
            size += plain_len;
            ids.push(id);
            present.push((id, ct_len));
            checks.extend(stamp.map(|s| (id, s)));
            progress(size);
            if ids.len() % SYNC_EVERY == 0 {
                node.chunks.sync()?;
            }
            Ok(())
        },
    )?;
    node.chunks.sync()?;
    // The files as written hash to their ids (they were hashed to name them).
    node.db.record_checks(&checks);
    let meta = ItemMeta {
        name: opts.name.clone(),
    }
    .encode_to_vec();
    let body = manifest::native_body(
        &node.identity,
        &opts.kind,
        size,
        chunk_size as u32,
        ids,
        crypto::encrypt_meta(&key, &meta),
        manifest::now_ms(),
    );
    let m = Manifest::create(&node.identity, body)?;
    let envelopes = envelopes_for_new_item(node, &m.id(), &key)?;
    node.db.insert_manifest(&m, &envelopes, &present)?;
    Ok(m.id())
}

/// Envelopes for this node and every keyed trusted peer whose public key is known
/// (peers known only by id get theirs just in time, when they first ask).
/// Public so that benches fill a store with the envelopes `put` makes.
pub fn envelopes_for_new_item(
    node: &Node,
    content_id: &ContentId,
    key: &ItemKey,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![(node.id().to_hex(), node.wrap_own(content_id, key)?)];
    for p in node.db.peers()? {
        if p.state != crate::store::PeerState::Trusted {
            continue;
        }
        // A blind peer never gets an envelope (PROTOCOL.md §2.1).
        if p.level == crate::store::Level::Blind {
            continue;
        }
        if let Some(spki) = &p.public_key {
            out.push((
                p.node_id.to_hex(),
                node.wrap_for_spki(spki, content_id, key)?,
            ));
        }
    }
    Ok(out)
}

/// The input of `put` cut into `(index, last, plaintext)` chunks: one chunk of
/// look-ahead tells the last one (an empty input is one empty chunk). Stops
/// with an error at the first chunk past the largest item, so a pipe of
/// unknown size is bounded.
struct InputChunks<'a> {
    input: &'a mut dyn Read,
    chunk_size: usize,
    next: Option<Vec<u8>>,
    index: u64,
    size: u64,
    done: bool,
}

impl<'a> InputChunks<'a> {
    fn new(input: &'a mut dyn Read, chunk_size: usize) -> InputChunks<'a> {
        InputChunks {
            input,
            chunk_size,
            next: None,
            index: 0,
            size: 0,
            done: false,
        }
    }

    fn step(&mut self) -> Result<(u64, bool, Vec<u8>)> {
        let cur = match self.next.take() {
            Some(c) => c,
            None => read_full(self.input, self.chunk_size)?,
        };
        let last = cur.len() < self.chunk_size || {
            let next = read_full(self.input, self.chunk_size)?;
            let empty = next.is_empty();
            self.next = Some(next);
            empty
        };
        self.size += cur.len() as u64;
        manifest::check_item_size(self.size, self.chunk_size as u32)?;
        self.index += 1;
        Ok((self.index - 1, last, cur))
    }
}

impl Iterator for InputChunks<'_> {
    type Item = Result<(u64, bool, Vec<u8>)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        self.done = !matches!(r, Ok((_, false, _)));
        Some(r)
    }
}

fn read_full(input: &mut dyn Read, n: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    input
        .take(n as u64)
        .read_to_end(&mut buf)
        .ctx("reading input")?;
    Ok(buf)
}

/// The item key from this node's own envelope. A native item without one
/// is an item this node mirrors blind (PROTOCOL.md §2.1: a blind mirror
/// stores manifests with no envelope of its own) or one awaiting its key
/// (§2.3), both `NoKey` (exit 11); an Axon item imported without its key
/// keeps `Denied`.
pub(crate) fn own_key(node: &Node, m: &Manifest) -> Result<ItemKey> {
    let wrapped = node
        .db
        .envelope(&m.id(), &node.id().to_hex())?
        .ok_or_else(|| match m.body().cipher() {
            Cipher::AxonAes256Cbc => Error::denied(format!(
                "item {} has no envelope for this node; it cannot be decrypted here",
                m.id()
            )),
            _ if mirrors_blind(node, &m.publisher()) => Error::no_key(format!(
                "no key: this node mirrors this item blind (item {} is stored and verified here, \
                 but this node holds no envelope for it; read it on a keyed node)",
                m.id()
            )),
            _ => Error::no_key(format!(
                "no key: item {} awaits its key (it is stored and verified here, from a blind \
                 mirror; a sync with a keyed peer of its publisher completes it)",
                m.id()
            )),
        })?;
    let key = node
        .open_envelope(&m.id(), &wrapped)
        .map_err(|e| e.context(format!("item {}", m.id())))?;
    crypto::decrypt_meta(&key, &m.body().encrypted_meta)
        .map_err(|e| e.context(format!("item {}", m.id())))?;
    Ok(key)
}

/// Whether this node holds items of `publisher` without a key by design:
/// the publisher serves it blind (its role there, PROTOCOL.md §2.1). An
/// item held without a key otherwise awaits one (§2.3).
pub(crate) fn mirrors_blind(node: &Node, publisher: &crate::crypto::NodeId) -> bool {
    node.db
        .peer(publisher)
        .ok()
        .flatten()
        .is_some_and(|p| p.role == Some(crate::store::Level::Blind))
}

/// The decrypted metadata of an item this node holds a key for.
pub fn item_meta(node: &Node, m: &Manifest) -> Result<ItemMeta> {
    let key = own_key(node, m)?;
    let plain = crypto::decrypt_meta(&key, &m.body().encrypted_meta)?;
    ItemMeta::decode(plain.as_slice())
        .map_err(|e| Error::integrity(format!("item {} metadata: {e}", m.id())))
}

pub(crate) fn load_manifest(node: &Node, id: &ContentId) -> Result<Manifest> {
    node.db
        .manifest(id)?
        .map(|(m, _)| m)
        .ok_or_else(|| Error::not_found(format!("no item {id} on this node (see `bitsync ls`)")))
}

/// Where `get` writes.
pub enum Output<'a> {
    File(&'a Path),
    Stream(&'a mut dyn Write),
}

/// Decrypt and verify an item into `out`. Returns its metadata and size.
pub fn get(
    node: &Node,
    id: &ContentId,
    out: Output<'_>,
    progress: &dyn Fn(u64),
) -> Result<(ItemMeta, u64)> {
    let m = load_manifest(node, id)?;
    let key = own_key(node, &m)?;
    let meta = ItemMeta::decode(crypto::decrypt_meta(&key, &m.body().encrypted_meta)?.as_slice())
        .map_err(|e| Error::integrity(format!("item {id} metadata: {e}")))?;
    match out {
        Output::Stream(w) => {
            let n = decrypt_to(node, &m, &key, w, progress)?;
            w.flush().ctx("flushing output")?;
            Ok((meta, n))
        }
        Output::File(path) => {
            let tmp = temp_sibling(path);
            let result = (|| -> Result<u64> {
                let f = fs::File::create(&tmp).ctx(format!("creating {}", tmp.display()))?;
                let n = {
                    // Small chunks are gathered into writes of one piece;
                    // a whole piece passes straight through.
                    let mut w = std::io::BufWriter::with_capacity(
                        crate::durable::WRITE_PIECE,
                        crate::durable::EarlyWriteback::new(&f),
                    );
                    let n = decrypt_to(node, &m, &key, &mut w, progress)?;
                    w.flush().ctx(format!("writing {}", tmp.display()))?;
                    n
                };
                f.sync_all().ctx(format!("syncing {}", tmp.display()))?;
                fs::rename(&tmp, path).ctx(format!("renaming output into {}", path.display()))?;
                Ok(n)
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            Ok((meta, result?))
        }
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    path.with_file_name(format!(".{name}.bitsync-{}.tmp", std::process::id()))
}

fn decrypt_to(
    node: &Node,
    m: &Manifest,
    key: &ItemKey,
    w: &mut dyn Write,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    match m.body().cipher() {
        Cipher::Aes256GcmChunked => {}
        Cipher::AxonAes256Cbc => return crate::legacy::decrypt_to(node, m, key, w, progress),
        Cipher::Unspecified => return Err(Error::integrity("manifest names no cipher")),
    }
    let n = m.chunk_count();
    let mut written = 0u64;
    let (workers, depth) = pipeline::shape(&node.chunks);
    // Workers read, hash and decrypt; this thread does the bookkeeping of a
    // failed chunk (quarantined by its worker, forgotten here) and writes in order.
    pipeline::ordered(
        m.chunk_ids().enumerate().map(Ok),
        workers,
        depth,
        |(i, id): (usize, ChunkId)| -> (ChunkId, Result<Vec<u8>>) {
            let plain = (|| {
                let (ct, _) = node.chunks.read_unchecked(&id)?;
                node.chunks.check(&id, &ct)?;
                if ct.len() as u64 != m.chunk_len(i) {
                    return Err(Error::integrity(format!(
                        "chunk {i} of item {} has the wrong length",
                        m.id()
                    )));
                }
                crypto::decrypt_chunk(key, i as u64, i + 1 == n, &ct)
            })();
            let plain = plain.map_err(|e| match e.kind() {
                crate::error::Kind::NotFound => Error::not_found(format!(
                    "item {} is incomplete: chunk {i} ({id}) is not here yet",
                    m.id()
                )),
                _ => e,
            });
            (id, plain)
        },
        |(id, plain)| {
            let plain = plain.map_err(|e| node.chunk_failed(&id, e))?;
            crate::durable::write_in_pieces(w, &plain).ctx("writing output")?;
            written += plain.len() as u64;
            progress(written);
            Ok(())
        },
    )?;
    if written != m.body().size {
        return Err(Error::integrity(format!(
            "item {} decrypted to {written} bytes, manifest says {}",
            m.id(),
            m.body().size
        )));
    }
    Ok(written)
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub(crate) manifests_checked: u64,
    pub problems: Vec<String>,
}

/// Re-hash every chunk, re-verify every manifest and check the database.
/// A chunk that fails its hash is quarantined and forgotten, so the next sync fetches it again.
pub fn verify(node: &Node, progress: &dyn Fn(u64, u64)) -> Result<VerifyReport> {
    let mut r = VerifyReport::default();
    for line in node.db.integrity_check()? {
        r.problems.push(format!("database: {line}"));
    }
    let chunks = node.db.chunk_list()?;
    let total: u64 = chunks.iter().map(|(_, s)| *s).sum();
    let mut done = 0u64;
    let mut good = Vec::new();
    // Chunks are read and hashed on every core; a failed one is quarantined
    // by its worker and forgotten here, in list order.
    let (workers, depth) = pipeline::shape(&node.chunks);
    pipeline::ordered(
        chunks.iter().map(Ok),
        workers,
        depth,
        |(id, size): &(ChunkId, u64)| {
            let checked = node.chunks.read_unchecked(id).and_then(|(data, stamp)| {
                node.chunks.check(id, &data)?;
                Ok(stamp)
            });
            (*id, *size, checked)
        },
        |(id, size, checked)| {
            match checked {
                Ok(stamp) => {
                    good.push((id, stamp));
                    if good.len() >= CHECKS_BATCH {
                        node.db.record_checks(&std::mem::take(&mut good));
                    }
                }
                Err(e) => {
                    let e = node.chunk_failed(&id, e);
                    r.problems.push(format!("chunk {id}: {e}"));
                }
            }
            r.chunks_checked += 1;
            done += size;
            progress(done, total);
            Ok(())
        },
    )?;
    node.db.record_checks(&good);
    for cid in node.db.content_ids()? {
        r.manifests_checked += 1;
        match node.db.manifest(&cid) {
            Ok(Some((m, _))) => {
                let missing = node.db.missing_chunks(&cid)?;
                if !missing.is_empty() {
                    r.problems.push(format!(
                        "item {cid}: {} of its chunks are missing",
                        missing.len()
                    ));
                }
                r.problems.extend(wrong_lengths(node, &m)?);
            }
            Ok(None) => r
                .problems
                .push(format!("item {cid}: vanished during verify")),
            Err(e) => r.problems.push(format!("item {cid}: {e}")),
        }
    }
    Ok(r)
}

/// The present chunks of `m` whose length is not the one its signed
/// manifest gives them (`Manifest::chunk_len`, from the item's size, chunk
/// size and cipher; FORMAT.md §2.2): such a chunk hashes to its id, so the
/// item can never be read (`get` fails on it), though every chunk checks.
fn wrong_lengths(node: &Node, m: &Manifest) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, id) in m.chunk_ids().enumerate() {
        let want = m.chunk_len(i);
        if let Some(len) = node.db.chunk_len(&id)? {
            if len != want {
                out.push(format!(
                    "item {}: chunk {i} ({id}) is {len} bytes, its signed manifest says {want} (DATA_LOSS)",
                    m.id()
                ));
            }
        }
    }
    Ok(out)
}

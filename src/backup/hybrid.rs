//! `bitsync clone TOKEN --from-backup DIR`: chunks from a local backup
//! repository, everything else (manifests, envelopes, missing chunks) from the
//! peer.
//!
//! The replicator hands this module the chunk ids it is about to stream. Each
//! chunk found in the repository is hash-checked by [`ChunkDir::write`]
//! before it is written, the batch is synced, and only then recorded as
//! present; ids that are not in the repository, or whose file there fails its
//! hash, are returned and fetched from the peer as usual. Manifests are always
//! the peer's and fully verified, so a repository can only save bandwidth,
//! never change what the clone holds.
//!
//! [`ChunkDir::write`]: crate::chunks::ChunkDir::write

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::copy;
use super::repo::Repo;
use crate::crypto::ChunkId;
use crate::error::{Kind, Result};
use crate::node::Node;

/// A place chunks may be read from before asking the peer.
pub trait ChunkSource: Send + Sync {
    /// The bytes stored under `id`, or `None` if this source has no such chunk.
    /// Need not be verified: the caller hash-checks before writing.
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>>;
    fn describe(&self) -> String;
}

/// The chunk directory of a backup repository.
pub struct RepoChunks {
    root: PathBuf,
    repo: PathBuf,
    _lock: super::FileLock,
    /// Chunks and bytes handed out (each hash-checked on read).
    pub hits: AtomicU64,
    pub hit_bytes: AtomicU64,
}

impl RepoChunks {
    /// Open the repository at `repo` (it must be one) and hold a reader's lock
    /// on it, so no prune removes chunks while the clone reads them.
    pub fn open(repo: &Path) -> Result<RepoChunks> {
        let r = Repo::open(repo)?;
        let lock = r.lock_shared()?;
        Ok(RepoChunks {
            root: r.chunks(),
            repo: repo.to_path_buf(),
            _lock: lock,
            hits: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
        })
    }
}

impl ChunkSource for RepoChunks {
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let path = copy::chunk_path(&self.root, id);
        let mut buf = Vec::new();
        // Size 0: any size; the hash check follows on write.
        match copy::read_verified(&path, id, 0, &mut buf, "the backup repository") {
            Ok(()) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.hit_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                Some(buf)
            }
            Err(e) if e.kind() == Kind::NotFound => None,
            Err(e) => {
                tracing::warn!("{e}; fetching it from the peer instead");
                None
            }
        }
    }
    fn describe(&self) -> String {
        format!("backup repository {}", self.repo.display())
    }
}

/// Chunks written between two syncs (and one database transaction).
const BATCH: usize = 64;

/// Store every chunk of `ids` that `src` holds with the right hash, synced and
/// recorded. Returns the ids stored; the others are to be fetched from the peer.
pub fn fill_from_local(
    node: &Node,
    src: &dyn ChunkSource,
    ids: &[ChunkId],
) -> Result<Vec<ChunkId>> {
    let mut stored = Vec::new();
    let mut batch: Vec<(ChunkId, u64)> = Vec::new();
    let flush = |batch: &mut Vec<(ChunkId, u64)>, stored: &mut Vec<ChunkId>| -> Result<()> {
        if !batch.is_empty() {
            node.chunks.sync()?;
            node.db.record_chunks(batch)?;
            stored.extend(batch.drain(..).map(|(c, _)| c));
        }
        Ok(())
    };
    for id in ids {
        if node.db.has_chunk(id)? {
            continue;
        }
        let Some(data) = src.read(id) else { continue };
        match node.chunks.write(id, &data) {
            Ok(()) => batch.push((*id, data.len() as u64)),
            Err(e) if e.kind() == Kind::Integrity => {
                tracing::warn!(chunk = %id, "{} holds a damaged copy; fetching it from the peer", src.describe());
            }
            Err(e) => return Err(e),
        }
        if batch.len() >= BATCH {
            flush(&mut batch, &mut stored)?;
        }
    }
    flush(&mut batch, &mut stored)?;
    Ok(stored)
}

//! `bitsync clone TOKEN --from-backup DIR`: chunks from a local backup
//! repository, everything else (manifests, envelopes, missing chunks) from the
//! peer.
//!
//! The replicator asks a [`ChunkSource`] for the chunks it is about to
//! stream; this module makes a backup repository one. Each chunk found in the
//! repository is hash-checked before it is written, the batch is synced, and
//! only then recorded as present; ids that are not in the repository, or
//! whose file there fails its hash, are fetched from the peer as usual.
//! Manifests are always the peer's and fully verified, so a repository can
//! only save bandwidth, never change what the clone holds.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::repo::Repo;
use crate::crypto::ChunkId;
use crate::error::{Kind, Result};
use crate::replicator::ChunkSource;

/// The chunks of a backup repository (a directory or an object store).
pub(crate) struct RepoChunks {
    repo: Repo,
    _lock: super::FileLock,
    /// Chunks and bytes handed out (each hash-checked on read).
    pub(crate) hits: AtomicU64,
    pub(crate) hit_bytes: AtomicU64,
}

impl RepoChunks {
    /// Open the repository at `repo` (it must be one) and hold a reader's lock
    /// on it, so no prune removes chunks while the clone reads them.
    pub fn open(repo: &Path) -> Result<RepoChunks> {
        let r = Repo::open(repo)?;
        let lock = r.lock_shared()?;
        Ok(RepoChunks {
            repo: r,
            _lock: lock,
            hits: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
        })
    }
}

impl ChunkSource for RepoChunks {
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        // Size 0: any size; the hash check follows on write.
        match self.repo.read_chunk(id, 0, &mut buf) {
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
        format!("backup repository {}", self.repo.name())
    }
}

//! The chunk store: encrypted chunks named by their SHA-256, on this
//! machine's disk or in an S3-compatible object store.
//!
//! [`Chunks`] is the one door to the chunks, and it holds the invariants for
//! every backend: a chunk is written only after its bytes hash to its id;
//! the database row that makes it "present" is written only after
//! [`Chunks::sync`] has made the write durable, so a crash can leave stray
//! chunks, never a present one that is missing or short; reads re-hash, and a
//! chunk that fails its hash is moved to quarantine instead of being served.
//! A backend ([`Backend`]: [`local::Dir`], [`bucket::Bucket`]) only moves
//! bytes: place, fetch, stamp, quarantine, remove, sync.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, Result};

mod bucket;
mod local;
pub(crate) mod pipeline;

pub use crate::objects::{BucketSpec, Credentials};

/// Upper bound on one chunk's ciphertext: the largest allowed chunk size plus the GCM tag.
pub(crate) const MAX_CHUNK_BYTES: usize = crate::manifest::MAX_CHUNK_SIZE as usize + 16;

/// What identifies one version of a stored chunk. For a file: which inode
/// it is, and the size and times the kernel keeps for it; a write, truncate,
/// rename or chmod of the file, or another file put in its place, changes at
/// least one field (ctime cannot be set from user space). For an object:
/// its ETag, size, modification time and version, which every PUT changes.
/// A hash check of the bytes is recorded with the stamp taken before they
/// were read (docs/FORMAT.md §4 "chunk_checks").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub(crate) fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// Where a node's chunks live.
#[derive(Debug, Clone)]
pub enum Location {
    /// A directory on this machine, with the quarantine dir beside it.
    Dir { root: PathBuf, quarantine: PathBuf },
    /// An S3-compatible bucket.
    Bucket(BucketSpec),
}

/// What a chunk store does with bytes; [`Chunks`] adds the checks.
trait Backend: Send + Sync + std::fmt::Debug {
    /// For messages: "chunk dir /path" or "object store s3://bucket/prefix".
    fn describe(&self) -> String;
    /// The object-store URL (no credentials), for `status`; `None` for a dir.
    fn url(&self) -> Option<&str> {
        None
    }
    /// Where a chunk's file is, for a store on the local disk.
    fn file(&self, _id: &ChunkId) -> Option<PathBuf> {
        None
    }
    /// How many reads one stream of chunks keeps in flight.
    fn read_ahead(&self) -> usize {
        1
    }
    /// Put bytes already checked against `id` into place, whole or not at
    /// all; durable once [`sync`](Self::sync) returns. Returns the stamp of
    /// what was placed when the write tells it for free (`None`: it would
    /// take another request).
    fn place(&self, id: &ChunkId, data: &[u8], reread: Reread) -> Result<Option<Stamp>>;
    fn sync(&self) -> Result<()>;
    /// The stored bytes, unchecked, with the stamp taken before they were
    /// read; an Integrity error from [`oversized`] if larger than any chunk.
    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)>;
    fn stamp(&self, id: &ChunkId) -> Result<Option<Stamp>>;
    /// Move the chunk to quarantine; `false` if it was not there.
    fn quarantine(&self, id: &ChunkId) -> Result<bool>;
    fn remove(&self, id: &ChunkId) -> Result<()>;
}

/// Whether a chunk being placed is likely to be read again soon: a local
/// store keeps it in the page cache then, and writes it straight to the disk
/// otherwise (chunks/local.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reread {
    /// A chunk this node just made (`put`): a `get` or a peer's fetch of
    /// what was just published is the common next step.
    Soon,
    /// A chunk copied in from a peer or a repository: a clone or a restore
    /// stores far more than anything reads back soon.
    Later,
}

fn oversized(id: &ChunkId, len: u64) -> Error {
    Error::integrity(format!(
        "chunk {id} is stored as {len} bytes, larger than any chunk"
    ))
}

#[derive(Debug, Clone)]
pub struct Chunks {
    backend: Arc<dyn Backend>,
}

impl Chunks {
    /// Open the store at `at`, clearing writes a crash left behind. An object
    /// store is reached at once (credentials and all), and its prefix must
    /// already be a chunk store unless `create`.
    pub fn open(at: &Location, create: bool) -> Result<Chunks> {
        let backend: Arc<dyn Backend> = match at {
            Location::Dir { root, quarantine } => Arc::new(local::Dir::open(root, quarantine)?),
            Location::Bucket(spec) => Arc::new(bucket::Bucket::open(spec, create)?),
        };
        Ok(Chunks { backend })
    }

    /// "chunk dir /path" or "object store s3://bucket/prefix".
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The object store's URL (never its credentials); `None` for a dir.
    pub fn url(&self) -> Option<&str> {
        self.backend.url()
    }

    /// Where chunk `id`'s file is, if this store is a directory on this machine.
    pub fn file(&self, id: &ChunkId) -> Option<PathBuf> {
        self.backend.file(id)
    }

    /// How many chunk reads a stream keeps in flight (more for a remote store).
    pub(crate) fn read_ahead(&self) -> usize {
        self.backend.read_ahead()
    }

    /// Verify `data` against `id` and put it into place, whole or not at all.
    /// Durable only after [`sync`](Self::sync); record it as present after that.
    /// Returns the placed chunk's stamp, if the store gave it: its bytes
    /// are the ones just hashed.
    pub fn write(&self, id: &ChunkId, data: &[u8]) -> Result<Option<Stamp>> {
        let actual = Hash::of(data);
        if actual != *id {
            return Err(Error::integrity(format!(
                "chunk {id} has the wrong content (its hash is {actual})"
            )));
        }
        self.backend.place(id, data, Reread::Later)
    }

    /// Write a chunk this node just made; its id is computed here, once.
    pub(crate) fn write_new(&self, data: &[u8]) -> Result<(ChunkId, Option<Stamp>)> {
        let id = Hash::of(data);
        let stamp = self.backend.place(&id, data, Reread::Soon)?;
        Ok((id, stamp))
    }

    /// Make every write so far durable (for a dir: file data and renames,
    /// with one syncfs(2)).
    pub fn sync(&self) -> Result<()> {
        self.backend.sync()
    }

    /// Read a chunk and check its hash. A mismatch quarantines it and is a DATA_LOSS error.
    pub(crate) fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (data, _) = self.read_unchecked(id)?;
        self.check(id, &data)?;
        Ok(data)
    }

    /// Read a chunk and check its hash, changing nothing: a mismatch is a
    /// DATA_LOSS error and the chunk stays where it is. For copies, which
    /// only ever read their source (`verify` quarantines).
    pub(crate) fn read_untouched(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let data = self.fetch_untouched(id)?;
        let actual = Hash::of(&data);
        if actual != *id {
            return Err(Error::integrity(format!(
                "chunk {id} in the {} fails its hash (its SHA-256 is {actual}): it is damaged",
                self.describe()
            )));
        }
        Ok(data)
    }

    /// The stored bytes of chunk `id` (bounded to the largest chunk),
    /// unchecked, changing nothing: the caller checks them.
    pub(crate) fn fetch_untouched(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.backend.fetch(id).map(|(data, _)| data)
    }

    /// Check `data`, just read from chunk `id`, against its id: a mismatch
    /// quarantines the chunk and is a DATA_LOSS error.
    pub(crate) fn check(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        if Hash::of(data) != *id {
            self.quarantine(id)?;
            return Err(Error::integrity(format!(
                "chunk {id} in the {} fails its hash; moved to quarantine (run `bitsync verify`, then re-sync it from a peer)",
                self.describe()
            )));
        }
        Ok(())
    }

    /// Read a chunk (bounded to the largest chunk) without checking its
    /// hash, with its stamp taken before the read: the caller must
    /// [`check`](Self::check) the bytes, or hold a check of that same stamp.
    pub(crate) fn read_unchecked(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)> {
        self.backend.fetch(id).inspect_err(|e| {
            if e.kind() == crate::error::Kind::Integrity {
                let _ = self.quarantine(id);
            }
        })
    }

    /// The stamp of chunk `id` as stored now; `None` if it is not there.
    pub(crate) fn stamp(&self, id: &ChunkId) -> Result<Option<Stamp>> {
        self.backend.stamp(id)
    }

    /// Move a bad chunk out of the way so it is never served again.
    pub(crate) fn quarantine(&self, id: &ChunkId) -> Result<()> {
        if self.backend.quarantine(id)? {
            tracing::warn!(chunk = %id, store = %self.describe(), "chunk failed its hash and was quarantined");
        }
        Ok(())
    }

    /// Delete a stray chunk (one no row records).
    pub(crate) fn remove(&self, id: &ChunkId) -> Result<()> {
        self.backend.remove(id)
    }
}

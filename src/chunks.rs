//! The chunk directory: encrypted chunks on disk, named by their SHA-256.
//!
//! Layout: `chunks/<first two hex chars>/<64 hex chars>`, plus `chunks/tmp/`
//! for writes in progress. A chunk file is only ever created by writing a temp
//! file and renaming it into place; the database row that makes it "present"
//! is written only after [`ChunkDir::sync`] has made those renames durable.
//! So a crash can leave stray files, never a present chunk that is missing or
//! short. Reads re-hash every chunk, and a chunk that fails its hash is moved
//! to `quarantine/` instead of being served.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, IoContext, Result};

pub(crate) mod pipeline;

/// A temp file untouched this long belongs to a writer that died.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Upper bound on one chunk's ciphertext: the largest allowed chunk size plus the GCM tag.
pub(crate) const MAX_CHUNK_BYTES: usize = crate::manifest::MAX_CHUNK_SIZE as usize + 16;

/// Largest single write(2) when storing a chunk (see [`ChunkDir::write`]).
const WRITE_PIECE: usize = 256 * 1024;

/// What identifies one version of a chunk file: which inode it is, and the
/// size and times the kernel keeps for it. A write, truncate, rename or
/// chmod of the file, or another file put in its place, changes at least one
/// field (ctime cannot be set from user space). A hash check of the file's
/// bytes is recorded with the stamp taken before they were read
/// (docs/FORMAT.md §4 "chunk_checks").
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

#[derive(Debug, Clone)]
pub struct ChunkDir {
    root: PathBuf,
    quarantine: PathBuf,
}

impl ChunkDir {
    /// Open (creating the tmp dir if needed) and clear writes left by a crash.
    pub fn open(root: &Path, quarantine: &Path) -> Result<ChunkDir> {
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).ctx(format!("creating {}", tmp.display()))?;
        fs::create_dir_all(quarantine).ctx(format!("creating {}", quarantine.display()))?;
        // Writes left by a crash. Only old ones: another process (a `put`
        // while the node serves) may be writing here right now.
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if stale.is_some_and(|age| age > STALE_TMP) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(ChunkDir {
            root: root.to_path_buf(),
            quarantine: quarantine.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Verify `data` against `id` and write it into place (temp file, rename).
    /// Durable only after [`sync`](Self::sync); record it as present after that.
    /// Returns the placed file's stamp: its bytes are the ones just hashed.
    pub fn write(&self, id: &ChunkId, data: &[u8]) -> Result<Stamp> {
        let actual = Hash::of(data);
        if actual != *id {
            return Err(Error::integrity(format!(
                "chunk {id} has the wrong content (its hash is {actual})"
            )));
        }
        self.place(id, data)
    }

    /// Write a chunk this node just made; its id is computed here, once.
    pub(crate) fn write_new(&self, data: &[u8]) -> Result<(ChunkId, Stamp)> {
        let id = Hash::of(data);
        let stamp = self.place(&id, data)?;
        Ok((id, stamp))
    }

    fn place(&self, id: &ChunkId, data: &[u8]) -> Result<Stamp> {
        let path = self.path(id);
        let dir = path.parent().expect("chunk path has a parent");
        let tmp = self.root.join("tmp").join(format!(
            "{}.{:016x}",
            id.to_hex(),
            rand::rngs::OsRng.next_u64()
        ));
        let result = (|| {
            let mut f = fs::File::create(&tmp).ctx(format!("creating {}", tmp.display()))?;
            // In pieces: one write(2) of 1 MiB or more into the page cache is
            // several times slower than the same bytes in 256 KiB writes on
            // Linux 6.x with large folios (measured: docs/BENCHMARKS.md, replication).
            for piece in data.chunks(WRITE_PIECE) {
                f.write_all(piece)
                    .ctx(format!("writing chunk {}", tmp.display()))?;
            }
            drop(f);
            if !dir.exists() {
                fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
            }
            fs::rename(&tmp, &path).ctx(format!("renaming chunk into {}", path.display()))?;
            // After the rename, which changes the inode's ctime.
            let m = fs::metadata(&path).ctx(format!("chunk {}", path.display()))?;
            Ok(Stamp::of(&m))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Make every write so far durable (file data and renames) with one syncfs(2).
    pub fn sync(&self) -> Result<()> {
        crate::durable::syncfs(&self.root)
    }

    /// Read a chunk and check its hash. A mismatch quarantines the file and is a DATA_LOSS error.
    pub(crate) fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (data, _) = self.read_unchecked(id)?;
        self.check(id, &data)?;
        Ok(data)
    }

    /// Check `data`, just read from chunk `id`'s file, against its id: a
    /// mismatch quarantines the file and is a DATA_LOSS error.
    pub(crate) fn check(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        if Hash::of(data) != *id {
            self.quarantine(id)?;
            return Err(Error::integrity(format!(
                "chunk {id} on disk fails its hash; moved to quarantine (run `bitsync verify`, then re-sync it from a peer)"
            )));
        }
        Ok(())
    }

    /// Read a chunk's file (bounded to the largest chunk) without checking its
    /// hash, with the file's stamp taken before the read: the caller must
    /// [`check`](Self::check) the bytes, or hold a check of that same stamp.
    pub(crate) fn read_unchecked(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)> {
        let path = self.path(id);
        let mut f = fs::File::open(&path).ctx(format!("chunk {id}"))?;
        let meta = f.metadata().ctx(format!("chunk {id}"))?;
        let stamp = Stamp::of(&meta);
        let len = meta.len() as usize;
        if len > MAX_CHUNK_BYTES {
            self.quarantine(id)?;
            return Err(Error::integrity(format!(
                "chunk {id} on disk is {len} bytes, larger than any chunk"
            )));
        }
        let mut data = Vec::with_capacity(len);
        f.read_to_end(&mut data)
            .ctx(format!("reading chunk {id}"))?;
        Ok((data, stamp))
    }

    /// Move a bad chunk out of the way so it is never served again.
    pub(crate) fn quarantine(&self, id: &ChunkId) -> Result<()> {
        let from = self.path(id);
        let to = self.quarantine.join(id.to_hex());
        match fs::rename(&from, &to) {
            Ok(()) => {
                tracing::warn!(chunk = %id, "chunk failed its hash and was quarantined");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::from_io(e, format!("quarantining chunk {id}"))),
        }
    }
}

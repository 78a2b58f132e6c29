//! The local backend: chunk files in a directory on this machine's disk.
//!
//! Layout: `chunks/<first two hex chars>/<64 hex chars>`, plus `chunks/tmp/`
//! for writes in progress and `quarantine/<64 hex chars>` beside it. A chunk
//! file is only ever created by writing a temp file and renaming it into
//! place, and it counts as durable once [`Backend::sync`] (one syncfs(2)) has
//! run, so a crash can leave stray files, never a short chunk.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::{Backend, Stamp, MAX_CHUNK_BYTES};
use crate::crypto::ChunkId;
use crate::error::{Error, IoContext, Result};

/// A temp file untouched this long belongs to a writer that died.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug)]
pub(super) struct Dir {
    root: PathBuf,
    quarantine: PathBuf,
}

impl Dir {
    /// Open (creating the tmp dir if needed) and clear writes left by a crash.
    pub(super) fn open(root: &Path, quarantine: &Path) -> Result<Dir> {
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
        Ok(Dir {
            root: root.to_path_buf(),
            quarantine: quarantine.to_path_buf(),
        })
    }

    pub(super) fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }
}

impl Backend for Dir {
    fn describe(&self) -> String {
        format!("chunk dir {}", self.root.display())
    }

    fn file(&self, id: &ChunkId) -> Option<PathBuf> {
        Some(self.path(id))
    }

    fn place(&self, id: &ChunkId, data: &[u8]) -> Result<Option<Stamp>> {
        let path = self.path(id);
        let dir = path.parent().expect("chunk path has a parent");
        let tmp = self.root.join("tmp").join(format!(
            "{}.{:016x}",
            id.to_hex(),
            rand::rngs::OsRng.next_u64()
        ));
        let result = (|| {
            let mut f = fs::File::create(&tmp).ctx(format!("creating {}", tmp.display()))?;
            crate::durable::write_in_pieces(&mut f, data)
                .ctx(format!("writing chunk {}", tmp.display()))?;
            // The batch's syncfs comes later; let the disk start now.
            crate::durable::start_writeback(&f, 0, 0);
            drop(f);
            if !dir.exists() {
                fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
            }
            fs::rename(&tmp, &path).ctx(format!("renaming chunk into {}", path.display()))?;
            // After the rename, which changes the inode's ctime.
            let m = fs::metadata(&path).ctx(format!("chunk {}", path.display()))?;
            Ok(Some(Stamp::of(&m)))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn sync(&self) -> Result<()> {
        crate::durable::syncfs(&self.root)
    }

    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)> {
        let path = self.path(id);
        let mut f = fs::File::open(&path).ctx(format!("chunk {id}"))?;
        let meta = f.metadata().ctx(format!("chunk {id}"))?;
        let stamp = Stamp::of(&meta);
        let len = meta.len() as usize;
        if len > MAX_CHUNK_BYTES {
            return Err(super::oversized(id, len as u64));
        }
        let mut data = Vec::with_capacity(len);
        f.read_to_end(&mut data)
            .ctx(format!("reading chunk {id}"))?;
        Ok((data, stamp))
    }

    fn stamp(&self, id: &ChunkId) -> Result<Option<Stamp>> {
        match fs::metadata(self.path(id)) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::from_io(e, format!("chunk {id}"))),
        }
    }

    fn quarantine(&self, id: &ChunkId) -> Result<bool> {
        let to = self.quarantine.join(id.to_hex());
        match fs::rename(self.path(id), to) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::from_io(e, format!("quarantining chunk {id}"))),
        }
    }

    fn remove(&self, id: &ChunkId) -> Result<()> {
        match fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::from_io(e, format!("removing chunk {id}"))),
        }
    }
}

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

use super::{Backend, Reread, Stamp, MAX_CHUNK_BYTES};
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

/// Alignment of a direct write's buffer, offset and length (the largest
/// logical block size in use; 512 on most disks).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// This thread's buffer for direct writes, kept between chunks: memory
    /// a thread keeps is memory it does not fault in again for every chunk.
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write a new chunk file: through the page cache when it will be read
/// again soon, with its write-back started at once; otherwise directly to
/// the disk (`O_DIRECT`), where the filesystem allows it. A clone writes
/// gigabytes nothing reads back soon, and on the machine measured the page
/// cache copy of a buffered write cost more than the write (BENCHMARKS.md,
/// issue 15). A direct write goes through an aligned buffer, padded to
/// [`DIRECT_ALIGN`], and the file is then cut to its length; where
/// `O_DIRECT` is refused (tmpfs, some FUSE) the write is buffered. Either
/// way the file is durable only after the store's syncfs.
fn write_file(path: &Path, data: &[u8], reread: Reread) -> std::io::Result<()> {
    if reread == Reread::Later {
        match write_direct(path, data) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // refused: buffered
            done => return done,
        }
    }
    // Create or truncate: a refused direct open may have created the file.
    let mut f = fs::File::create(path)?;
    crate::durable::write_in_pieces(&mut f, data)?;
    // The batch's syncfs comes later; let the disk start now.
    crate::durable::start_writeback(&f, 0, 0);
    Ok(())
}

fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let padded = data.len().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    DIRECT_BUF.with_borrow_mut(|buf| {
        buf.resize(padded + DIRECT_ALIGN, 0);
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut buf[at..at + padded];
        aligned[..data.len()].copy_from_slice(data);
        aligned[data.len()..].fill(0);
        (&f).write_all(aligned)
    })?;
    if padded != data.len() {
        f.set_len(data.len() as u64)?;
    }
    Ok(())
}

impl Backend for Dir {
    fn describe(&self) -> String {
        format!("chunk dir {}", self.root.display())
    }

    fn file(&self, id: &ChunkId) -> Option<PathBuf> {
        Some(self.path(id))
    }

    fn place(&self, id: &ChunkId, data: &[u8], reread: Reread) -> Result<Option<Stamp>> {
        let path = self.path(id);
        let dir = path.parent().expect("chunk path has a parent");
        let tmp = self.root.join("tmp").join(format!(
            "{}.{:016x}",
            id.to_hex(),
            rand::rngs::OsRng.next_u64()
        ));
        let result = (|| {
            write_file(&tmp, data, reread).ctx(format!("writing chunk {}", tmp.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of writing give the file exactly the bytes, whatever the
    /// length's alignment (a direct write is padded, then cut).
    #[test]
    fn direct_and_buffered_writes_leave_exactly_the_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        for (i, len) in [0usize, 10, 4096, 4097, MAX_CHUNK_BYTES]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            for reread in [Reread::Soon, Reread::Later] {
                let path = tmp.path().join(format!("{i}-{reread:?}"));
                write_file(&path, &data, reread).unwrap();
                assert_eq!(fs::read(&path).unwrap(), data, "{len} bytes, {reread:?}");
            }
        }
    }
}

//! The chunk copy engine shared by backup, restore and clone-instance.
//!
//! Chunks are copied between directories laid out like a data dir's
//! `chunks/` (`<first two hex chars>/<64 hex chars>`), or between such a
//! directory and a node's object store ([`End::Store`]). Each chunk is read
//! whole (chunks are at most [`MAX_CHUNK_BYTES`]), hashed, compared with its
//! id, written to a temporary file and renamed into place; the caller makes
//! the batch durable with one syncfs(2) before recording anything that
//! depends on it. The source is only ever read: a chunk failing its hash is
//! reported by path and stops the copy, it is not quarantined.
//!
//! Several threads copy at once (SHA-256 and the page cache both scale), each
//! with its own reusable buffer.
//!
//! The bytes are moved with copy_file_range(2) from the same open file
//! descriptor that was just read and hashed (an in-kernel copy, several times
//! faster than write(2) from user memory on the machines measured; see
//! docs/BENCHMARKS.md), falling back to write(2) where the kernel cannot.
//! Chunk files are never modified in place (only created by rename), and the
//! descriptor pins the inode, so the copied bytes are the hashed bytes.
//! An object store has no such shortcut: its chunks are fetched into memory,
//! hashed there and written from there (one chunk per worker at a time).

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::chunks::{Chunks, MAX_CHUNK_BYTES};
use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, IoContext, Result};

/// `root/<xx>/<hex>`: where chunk `id` lives under a chunk directory.
pub(crate) fn chunk_path(root: &Path, id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    root.join(&hex[..2]).join(hex)
}

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CopyStats {
    /// Chunks written to the destination.
    pub(crate) copied: u64,
    pub(crate) copied_bytes: u64,
    /// Chunks already present at the destination with the right size.
    pub(crate) skipped: u64,
}

/// One side of a copy.
#[derive(Clone, Copy)]
pub(crate) enum End<'a> {
    /// A directory laid out like a data dir's `chunks/`.
    Dir(&'a Path),
    /// A node's chunk store in an object store. As a source it is only read
    /// (a chunk failing its hash stops the copy and stays where it is); as a
    /// destination each chunk is one atomic PUT, durable once it returns.
    Store(&'a Chunks),
}

pub(crate) struct CopyJob<'a> {
    pub(crate) src: End<'a>,
    pub(crate) dst: End<'a>,
    /// Where temporary files go (same filesystem as a `Dir` destination).
    pub(crate) tmp_dir: &'a Path,
    /// Skip chunks whose destination file (or object) exists with the
    /// expected size (incremental backups). Without it every chunk is written.
    pub(crate) skip_existing: bool,
    /// How the source is named in errors ("the data dir", "the repository").
    pub(crate) src_label: &'a str,
    /// Write each chunk straight under its final name instead of a temp file
    /// and a rename: only for destinations that are themselves staged and
    /// become visible as a whole after a sync (restore, clone-instance).
    pub(crate) staged: bool,
    /// The source is outside input (a backup repository): chunk files that
    /// are not regular files (FIFOs, symbolic links) are refused unopened.
    /// A node's own data dir is read as it is (its owner can do worse).
    pub(crate) outside_src: bool,
}

/// Copies are mostly waiting on the filesystem (creates, renames), not on
/// the CPU (SHA-256 runs at GB/s), so more threads than cores pay off:
/// 4 per core, 1 to 16; `BITSYNC_COPY_THREADS` overrides (for measuring).
fn threads() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::env::var("BITSYNC_COPY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cpus * 4)
        .clamp(1, 16)
}

/// Copy every chunk in `list` (id, ciphertext size) from `job.src` to
/// `job.dst`, re-hashing each. Stops at the first failure and returns it;
/// chunks already renamed into place stay (they are whole and named by their
/// hash, so they are harmless and reused by the next run).
pub(crate) fn copy_chunks(
    job: &CopyJob<'_>,
    list: &[(ChunkId, u64)],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<CopyStats> {
    if let End::Dir(dst_root) = job.dst {
        make_dirs(job.tmp_dir, dst_root, list)?;
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let copied = AtomicU64::new(0);
    let copied_bytes = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let done_bytes = AtomicU64::new(0);
    let pid = std::process::id();
    std::thread::scope(|s| {
        for worker in 0..threads() {
            let (next, stop, first_error) = (&next, &stop, &first_error);
            let (copied, copied_bytes, skipped, done_bytes) =
                (&copied, &copied_bytes, &skipped, &done_bytes);
            s.spawn(move || {
                let mut buf = Vec::with_capacity(MAX_CHUNK_BYTES);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, size)) = list.get(i) else { break };
                    match copy_one(job, id, *size, &mut buf, (pid, worker), &mut n) {
                        Ok(true) => {
                            copied.fetch_add(1, Ordering::Relaxed);
                            copied_bytes.fetch_add(*size, Ordering::Relaxed);
                        }
                        Ok(false) => {
                            skipped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                    progress(done_bytes.fetch_add(*size, Ordering::Relaxed) + size);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(CopyStats {
        copied: copied.into_inner(),
        copied_bytes: copied_bytes.into_inner(),
        skipped: skipped.into_inner(),
    })
}

/// The temp dir, the destination and its `<xx>` directories, made once up
/// front rather than raced for by the workers.
fn make_dirs(tmp_dir: &Path, dst_root: &Path, list: &[(ChunkId, u64)]) -> Result<()> {
    fs::create_dir_all(tmp_dir).ctx(format!("creating {}", tmp_dir.display()))?;
    fs::create_dir_all(dst_root).ctx(format!("creating {}", dst_root.display()))?;
    let prefixes: HashSet<String> = list
        .iter()
        .map(|(id, _)| id.to_hex()[..2].to_string())
        .collect();
    for p in &prefixes {
        let d = dst_root.join(p);
        match fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::from_io(e, format!("creating {}", d.display()))),
        }
    }
    Ok(())
}

/// Copy one chunk; `Ok(false)` when it was already there.
fn copy_one(
    job: &CopyJob<'_>,
    id: &ChunkId,
    size: u64,
    buf: &mut Vec<u8>,
    worker: (u32, usize),
    n: &mut u64,
) -> Result<bool> {
    if job.skip_existing && already_there(job.dst, id, size)? {
        return Ok(false);
    }
    let (src_root, dst_root) = match (job.src, job.dst) {
        (End::Dir(s), End::Dir(d)) => (s, d),
        _ => return copy_through_memory(job, id, size, buf, worker, n).map(|()| true),
    };
    let src = chunk_path(src_root, id);
    let src_file = open_verified(&src, id, size, buf, job.src_label, job.outside_src)?;
    place_file(job, dst_root, id, worker, n, |f, tmp| {
        let copied = copy_range(&src_file, f, buf.len() as u64).ctx(format!(
            "copying {} to {}",
            src.display(),
            tmp.display()
        ))?;
        if !copied {
            f.write_all(buf).ctx(format!("writing {}", tmp.display()))?;
        }
        Ok(())
    })?;
    Ok(true)
}

/// Whether chunk `id` is at `dst` with the expected size.
fn already_there(dst: End<'_>, id: &ChunkId, size: u64) -> Result<bool> {
    let len = match dst {
        End::Dir(d) => fs::metadata(chunk_path(d, id)).ok().map(|m| m.len()),
        End::Store(s) => s.stamp(id)?.map(|st| st.size),
    };
    Ok(len == Some(size))
}

/// Create chunk `id`'s file under `dst_root` with `write`: under a temp name
/// renamed into place, or (staged) under its own name; removed on failure.
fn place_file(
    job: &CopyJob<'_>,
    dst_root: &Path,
    id: &ChunkId,
    (pid, worker): (u32, usize),
    n: &mut u64,
    write: impl FnOnce(&mut fs::File, &Path) -> Result<()>,
) -> Result<()> {
    let dst = chunk_path(dst_root, id);
    *n += 1;
    let tmp = if job.staged {
        dst.clone()
    } else {
        job.tmp_dir
            .join(format!("{}.{pid}.{worker}.{n}", id.to_hex()))
    };
    let result = (|| {
        let mut f = fs::File::create(&tmp).ctx(format!("creating {}", tmp.display()))?;
        write(&mut f, &tmp)?;
        drop(f);
        if !job.staged {
            fs::rename(&tmp, &dst).ctx(format!("renaming a chunk into {}", dst.display()))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`copy_one`] where one side is an object store: the chunk is fetched
/// into `buf`, hashed there and written from there.
fn copy_through_memory(
    job: &CopyJob<'_>,
    id: &ChunkId,
    size: u64,
    buf: &mut Vec<u8>,
    worker: (u32, usize),
    n: &mut u64,
) -> Result<()> {
    match job.src {
        End::Dir(s) => {
            let src = chunk_path(s, id);
            open_verified(&src, id, size, buf, job.src_label, job.outside_src)?;
        }
        End::Store(s) => {
            *buf = s.read_untouched(id)?;
            if size != 0 && buf.len() as u64 != size {
                return Err(Error::integrity(format!(
                    "chunk {id} in the {} is {} bytes, expected {size}: it is damaged",
                    s.describe(),
                    buf.len()
                )));
            }
        }
    }
    match job.dst {
        End::Store(s) => s.write(id, buf).map(|_| ()),
        End::Dir(d) => place_file(job, d, id, worker, n, |f, tmp| {
            f.write_all(buf).ctx(format!("writing {}", tmp.display()))
        }),
    }
}

/// Copy `len` bytes from the start of `src` to the start of the empty `dst`
/// inside the kernel. `Ok(false)`: this kernel or filesystem cannot, nothing
/// was written, use write(2).
fn copy_range(src: &fs::File, dst: &fs::File, len: u64) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let (mut off_in, mut off_out): (libc::loff_t, libc::loff_t) = (0, 0);
    while (off_out as u64) < len {
        let want = (len - off_out as u64) as usize;
        // SAFETY: valid descriptors and offset pointers to live locals; no other memory is touched.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
            );
            if unsupported && off_out == 0 {
                return Ok(false);
            }
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the chunk file got shorter while it was copied",
            ));
        }
    }
    Ok(true)
}

/// Read the chunk file at `path` (in a repository: a regular file only) into
/// `buf` and check it is chunk `id` of `size` bytes (`size` 0: any size).
/// Errors name the file.
pub(crate) fn read_verified(
    path: &Path,
    id: &ChunkId,
    size: u64,
    buf: &mut Vec<u8>,
    src_label: &str,
) -> Result<()> {
    open_verified(path, id, size, buf, src_label, true).map(|_| ())
}

/// [`read_verified`], returning the open file (positioned at its end).
fn open_verified(
    path: &Path,
    id: &ChunkId,
    size: u64,
    buf: &mut Vec<u8>,
    src_label: &str,
    regular_only: bool,
) -> Result<fs::File> {
    buf.clear();
    // A repository may be someone else's: a chunk file that is a FIFO or a
    // symbolic link (to /etc/shadow, say) is refused unopened, so neither
    // a hang nor the outside file's size.
    let opened = if regular_only {
        crate::durable::open_regular(path)
    } else {
        fs::File::open(path)
    };
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "chunk {id} is missing from {src_label} ({})",
                path.display()
            )))
        }
        // Not a regular file: the store is damaged (or forged), not the disk.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(Error::integrity(format!(
                "chunk {} in {src_label} {e}: it is damaged",
                path.display()
            )))
        }
        Err(e) => {
            return Err(Error::from_io(
                e,
                format!("opening chunk {}", path.display()),
            ))
        }
    };
    let len = f.metadata().ctx(format!("chunk {}", path.display()))?.len();
    if len > MAX_CHUNK_BYTES as u64 || (size != 0 && len != size) {
        return Err(Error::integrity(format!(
            "chunk {} in {src_label} is {len} bytes, expected {size}: it is damaged",
            path.display()
        )));
    }
    buf.reserve(len as usize + 1);
    (&mut f)
        .take(MAX_CHUNK_BYTES as u64 + 1)
        .read_to_end(buf)
        .ctx(format!("reading chunk {}", path.display()))?;
    let actual = Hash::of(buf);
    if actual != *id {
        return Err(Error::integrity(format!(
            "chunk {} in {src_label} fails its hash (its SHA-256 is {actual}): it is damaged",
            path.display()
        )));
    }
    Ok(f)
}

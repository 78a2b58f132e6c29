//! Offline copies of an instance: backup repositories, restore, clone-instance,
//! and importing Axon BBS backups.
//!
//! - [`repo`]: the backup repository (`bitsync backup`, `backup verify`,
//!   `backup ls`): snapshots of the database taken with SQLite's online backup
//!   API while the node runs, plus content-addressed chunks shared by every
//!   snapshot, so a second run copies only what is new. The byte layout is
//!   specified in `docs/FORMAT.md` ("Backup repository").
//! - [`restore`]: a snapshot back into a fresh data dir, with the same identity
//!   (disaster recovery) or a new one (every envelope re-wrapped).
//! - [`clone_instance`]: a verified, consistent copy of a live node's database
//!   and chunks to other paths (CISO Assistant's `clone_instance` interface).
//! - [`import_axon`]: an Axon BBS backup into this node, as legacy-cipher items
//!   and, with the Axon key, as native items too.
//! - [`onion`]: the onion service's keys, sealed in snapshots taken
//!   `--with-identity`, so a restored node keeps its `.onion` address.
//! - [`hybrid`]: a backup repository as a local chunk source for
//!   `bitsync clone --from-backup`.
//! - [`dbcopy`] and [`copy`]: the two copy engines everything above shares: a
//!   consistent database snapshot, and hash-checked parallel chunk copies.
//!
//! Every command here follows the same rules: the source is only read; what is
//! written is built under a temporary name and renamed into place after an
//! fsync, so an interrupted run leaves either the old state or the new one,
//! never half of it; chunks are re-hashed on every copy.

pub(crate) mod clone_instance;
pub(crate) mod copy;
pub(crate) mod dbcopy;
pub(crate) mod hybrid;
pub(crate) mod import_axon;
pub(crate) mod onion;
pub(crate) mod repo;
pub(crate) mod restore;

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::chunks::Chunks;
use crate::error::{Error, IoContext, Result};
use crate::node::Paths;

/// The object store that holds the chunks of the data dir at `root`, as
/// its config.toml names it (reached and its marker checked now, or written
/// if `create`, so a wrong endpoint or key fails before anything is copied);
/// `None` when they are in the data dir's own chunk dir.
pub(crate) fn bucket_of(root: &Path, create: bool) -> Result<Option<Chunks>> {
    let paths = Paths::new(root);
    if !paths.config().is_file() {
        return Ok(None);
    }
    let c = crate::config::Config::load(&paths.config())?;
    if c.chunks.url.is_none() {
        return Ok(None);
    }
    let at = c
        .chunks
        .location(root, paths.chunks(), paths.quarantine())?;
    Chunks::open(&at, create).map(Some)
}

/// fsync a file by path.
pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .ctx(format!("syncing {}", path.display()))
}

pub(crate) use crate::durable::{sync_dir as fsync_dir, syncfs, temp_sibling, write_atomic};

/// True when `path` does not exist or is an empty directory.
pub(crate) fn is_missing_or_empty_dir(path: &Path) -> Result<bool> {
    match fs::read_dir(path) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(false),
        Err(e) => Err(Error::from_io(e, format!("reading {}", path.display()))),
    }
}

/// Create a directory (and parents) only the owner may enter.
pub(crate) fn create_private_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).ctx(format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .ctx(format!("setting mode 0700 on {}", path.display()))
}

/// Removes a directory tree when dropped, unless [`disarm`](Self::disarm)ed:
/// what a failed run was building never outlives it.
pub(crate) struct TempTree {
    path: Option<PathBuf>,
}

impl TempTree {
    pub(crate) fn new(path: PathBuf) -> TempTree {
        TempTree { path: Some(path) }
    }
    pub(crate) fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_dir_all(&p);
            let _ = fs::remove_file(&p);
        }
    }
}

/// Free bytes for unprivileged writers on the filesystem holding `path`
/// (the nearest existing ancestor), if statvfs can tell.
pub(crate) fn free_space(path: &Path) -> Option<u64> {
    let mut p = path;
    loop {
        if p.exists() {
            break;
        }
        p = p.parent()?;
        if p.as_os_str().is_empty() {
            p = Path::new(".");
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuse early when a copy of `need` bytes cannot fit at `dest`.
pub(crate) fn check_space(dest: &Path, need: u64) -> Result<()> {
    if let Some(free) = free_space(dest) {
        // Keep a little headroom for directories and the database's journal.
        let need_with_margin = need + need / 50 + (8 << 20);
        if free < need_with_margin {
            return Err(Error::exhausted(format!(
                "{} has {} free, the copy needs about {}: free some space and run the command again (nothing was written)",
                dest.display(),
                human_bytes(free),
                human_bytes(need_with_margin)
            )));
        }
    }
    Ok(())
}

/// "1.5 GiB", "312 KiB", "17 B".
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// An advisory lock (flock) on a file, released when dropped or when the process dies.
pub(crate) struct FileLock {
    _file: fs::File,
}

impl FileLock {
    /// Take the lock without waiting; `exclusive` for writers, shared for readers.
    pub(crate) fn try_lock(path: &Path, exclusive: bool, busy: &str) -> Result<FileLock> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx(format!("opening lock file {}", path.display()))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        // SAFETY: flock on a valid open descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::unavailable(busy.to_string()));
            }
            return Err(Error::from_io(e, format!("locking {}", path.display())));
        }
        Ok(FileLock { _file: file })
    }
}

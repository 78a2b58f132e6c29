//! Durable file writes, shared by every room that must survive a crash:
//! write a temp file beside the target, fsync it, rename it into place, fsync
//! the directory; or, for many files at once, one syncfs(2).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// fsync a directory so a rename inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(format!("syncing directory {}", dir.display()))
}

/// Flush every dirty page of the filesystem holding `path` (one syncfs(2)).
pub(crate) fn syncfs(path: &Path) -> Result<()> {
    let d = fs::File::open(path).ctx(format!("opening {}", path.display()))?;
    // SAFETY: syncfs takes a valid open file descriptor and has no memory effects.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::from_io(
            std::io::Error::last_os_error(),
            format!("syncing {}", path.display()),
        ));
    }
    Ok(())
}

/// Largest single write(2) of bulk data (chunk files, `get`'s output): one
/// write of 1 MiB or more into the page cache is several times slower than
/// the same bytes in 256 KiB writes on Linux 6.x with large folios
/// (measured: docs/BENCHMARKS.md, replication and issue 15).
pub(crate) const WRITE_PIECE: usize = 256 * 1024;

/// `w.write_all(data)` in [`WRITE_PIECE`]s.
pub(crate) fn write_in_pieces(w: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    data.chunks(WRITE_PIECE)
        .try_for_each(|piece| w.write_all(piece))
}

/// Start the kernel's write-back of `len` bytes of `file` from `offset` (0:
/// to its end) and return at once (sync_file_range(2) with
/// `SYNC_FILE_RANGE_WRITE` queues the I/O), so the disk works while the
/// caller goes on producing data and the closing fsync or syncfs finds little
/// left to do. Durability is still that fsync's; this only moves the waiting
/// earlier, and a failure here is left for it to report.
pub(crate) fn start_writeback(file: &fs::File, offset: u64, len: u64) {
    // SAFETY: a valid open descriptor and a byte range; no memory effects.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// A writer over one file that [starts the write-back](start_writeback) of
/// every [`WRITEBACK_STEP`] bytes once they are written (`get`'s output: the
/// fsync after the last byte then waits for the last step, not the file).
pub(crate) struct EarlyWriteback<'a> {
    file: &'a fs::File,
    written: u64,
    started: u64,
}

/// How much [`EarlyWriteback`] lets pile up before starting its write-back.
const WRITEBACK_STEP: u64 = 8 << 20;

impl<'a> EarlyWriteback<'a> {
    pub(crate) fn new(file: &'a fs::File) -> EarlyWriteback<'a> {
        EarlyWriteback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for EarlyWriteback<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_STEP {
            start_writeback(self.file, self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The directory `path` is in ("." for a bare name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Write `bytes` to a new file `tmp` with `mode` and fsync it.
fn write_synced(tmp: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .ctx(format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .ctx(format!("writing {}", tmp.display()))?;
    f.sync_all().ctx(format!("syncing {}", tmp.display()))
}

/// Write `bytes` to `path` atomically: temp file beside it, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_sibling(path, "tmp");
    let result = write_synced(&tmp, bytes, mode).and_then(|_| {
        fs::rename(&tmp, path).ctx(format!("renaming {} into place", tmp.display()))?;
        sync_dir(parent_dir(path))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`], unless `path` exists: then nothing is written and the
/// result is `false`. The temp file is hard-linked into place (which, unlike
/// rename, never replaces), so of two processes creating the same file at
/// once exactly one wins and both then read the winner's.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    let tmp = temp_sibling(path, "new");
    let result = write_synced(&tmp, bytes, mode).and_then(|_| match fs::hard_link(&tmp, path) {
        Ok(()) => sync_dir(parent_dir(path)).map(|_| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::from_io(
            e,
            format!("linking {} into place", path.display()),
        )),
    });
    let _ = fs::remove_file(&tmp);
    result
}

/// A hidden name beside `path` for building it: `.<name>.<tag>-<pid>`.
pub(crate) fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bitsync");
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Open a file named by outside input (a backup someone else made) for
/// reading, refusing anything but a regular file: a symbolic link as the last
/// component is refused by the kernel (`O_NOFOLLOW`, so its target is never
/// opened), and a FIFO or device is opened without blocking (`O_NONBLOCK`:
/// opening a FIFO with no writer would wait forever) and then refused by its
/// type. The errors say only what the name is, nothing about a link's target.
/// Directories above the file are the caller's to confine.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<fs::File> {
    use std::io::{Error as IoError, ErrorKind};
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => IoError::new(
                ErrorKind::InvalidInput,
                "is a symbolic link, which is refused here (only regular files are read)",
            ),
            _ => e,
        })?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_block_device() || ft.is_char_device() {
            "a device"
        } else {
            "a special file"
        };
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            format!("is {what}, not a regular file; refused"),
        ));
    }
    Ok(f)
}

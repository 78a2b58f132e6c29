//! Opening the backup's files: only regular files inside the backup folder,
//! and JSON files only up to a stated size.
//!
//! A backup is outside input: whoever made it chooses its file types and
//! links. A FIFO would make a plain `open` wait forever, and a symbolic link
//! (to a file, or a folder such as `chunks/`) would have the importer read,
//! store or describe a file outside the backup. So every file is opened with
//! [`crate::durable::open_regular`] (no link followed as the last component,
//! never blocking, regular files only) after its folder was resolved and
//! found inside the backup's canonical path; the errors say what is refused,
//! never anything about what a link points at.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde_json::Value;

use super::{io_err, AxonError, Result};

/// The largest `backup_manifest.json` read: it lists applet names only
/// (real ones are a few KiB).
pub(super) const MAX_BACKUP_MANIFEST: u64 = 16 << 20;
/// The largest `metadata.json` read: one code manifest, 67 bytes per 256 KiB
/// piece and ~700 per recipient, so 16 MiB is an applet of about 50 GiB.
pub(super) const MAX_METADATA: u64 = 16 << 20;
/// The largest `applet_data.json` read: ~1–2 KiB per user's data instance,
/// so 64 MiB is some 30,000 instances of one applet. Parsing holds about 15×
/// the file in memory, which is what these limits bound.
pub(super) const MAX_APPLET_DATA: u64 = 64 << 20;
/// The largest piece read (`chunk_size`): Axon writes 262,144; an item whose
/// manifest says more than this is refused rather than read.
pub const MAX_PIECE_SIZE: u32 = 16 << 20;

/// Open `path` for reading if it is a regular file whose folder is inside
/// `root` (canonical). A missing file or folder is `NotFound`, as for `open`.
pub(super) fn open_input(root: &Path, path: &Path) -> io::Result<File> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let real = std::fs::canonicalize(parent)?;
    if !real.starts_with(root) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "is reached through a symbolic link that leads out of the backup folder; refused",
        ));
    }
    crate::durable::open_regular(path)
}

/// Parse the JSON file at `path`, refused unread when over `limit` bytes.
pub(super) fn read_json(root: &Path, path: &Path, limit: u64) -> Result<Value> {
    match read_json_if_present(root, path, limit)? {
        Some(v) => Ok(v),
        None => Err(io_err(
            path,
            "cannot read",
            io::Error::from(io::ErrorKind::NotFound),
        )),
    }
}

/// [`read_json`], `None` when the file does not exist.
pub(super) fn read_json_if_present(root: &Path, path: &Path, limit: u64) -> Result<Option<Value>> {
    let file = match open_input(root, path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "cannot read", e)),
    };
    let too_large = |size: u64| AxonError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let size = file
        .metadata()
        .map_err(|e| io_err(path, "cannot read", e))?
        .len();
    if size > limit {
        return Err(too_large(size));
    }
    let mut text = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut text)
        .map_err(|e| io_err(path, "cannot read", e))?;
    if text.len() as u64 > limit {
        return Err(too_large(text.len() as u64));
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| AxonError::Json {
            path: path.to_path_buf(),
            source,
        })
}

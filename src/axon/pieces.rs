//! [`check_item`]: the pieces on disk against the manifest's hashes.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{io_err, AxonError, AxonItem, ChunkState, Result};

/// Hashes every piece of `item` on disk and says, per piece, whether it is the
/// piece the manifest names. Each file is streamed through SHA-256 with a
/// fixed buffer and never read past `chunk_size + 1` bytes.
///
/// A missing file is [`ChunkState::Missing`]; a file with the wrong length or
/// hash is [`ChunkState::Corrupt`]. Other I/O failures (permissions, a
/// directory where a file should be) are errors, since they say nothing about
/// the backup's content.
pub fn check_item(item: &AxonItem) -> Result<Vec<ChunkState>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut states = Vec::with_capacity(item.chunk_paths.len());
    for (index, path) in item.chunk_paths.iter().enumerate() {
        let state = match File::open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => ChunkState::Missing,
            Err(e) => return Err(io_err(path, "cannot open chunk", e)),
            Ok(file) => {
                let limit = u64::from(item.manifest.chunk_size);
                let mut reader = file.take(limit + 1);
                let mut hasher = Sha256::new();
                let mut len = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_err(path, "cannot read chunk", e)),
                    };
                    hasher.update(&buf[..n]);
                    len += n as u64;
                }
                match piece_problem(item, index, len, hasher.finalize().into()) {
                    None => ChunkState::Ok,
                    Some(reason) => ChunkState::Corrupt { reason },
                }
            }
        };
        states.push(state);
    }
    Ok(states)
}

/// Why piece `index`, `len` bytes long (at most `chunk_size + 1` read) with
/// SHA-256 `actual`, is not the piece the manifest names; `None` if it is.
pub(super) fn piece_problem(
    item: &AxonItem,
    index: usize,
    len: u64,
    actual: [u8; 32],
) -> Option<String> {
    let m = &item.manifest;
    let chunk_size = u64::from(m.chunk_size);
    let Some(expected) = m.chunk_hashes.get(index) else {
        return Some("the manifest has no hash for this piece".to_owned());
    };
    if len > chunk_size {
        return Some(format!(
            "longer than the manifest's chunk_size of {chunk_size} bytes"
        ));
    }
    if actual == *expected {
        return None;
    }
    let last = index + 1 == m.chunk_hashes.len();
    Some(if len == 0 {
        "empty file".to_owned()
    } else if !last && len < chunk_size {
        format!("truncated: {len} of {chunk_size} bytes (SHA-256 does not match)")
    } else {
        format!(
            "SHA-256 is {}, the manifest says {} ({len} bytes)",
            hex::encode(actual),
            hex::encode(expected)
        )
    })
}

/// Read piece `index` into `buf` (replacing what it held) and check it
/// against the manifest: at most `limit + 1` bytes are read.
pub(super) fn read_piece(
    item: &AxonItem,
    index: usize,
    path: &Path,
    limit: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.clear();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AxonError::PieceMissing {
                item: item.label(),
                index,
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path, "cannot open chunk", e)),
    };
    // The file's size, where known, saves the buffer from growing by doubling.
    let hint = file.metadata().map(|m| m.len().min(limit + 1)).unwrap_or(0);
    buf.reserve(hint as usize);
    file.take(limit + 1)
        .read_to_end(buf)
        .map_err(|e| io_err(path, "cannot read chunk", e))?;
    let actual: [u8; 32] = Sha256::digest(&buf[..]).into();
    if let Some(reason) = piece_problem(item, index, buf.len() as u64, actual) {
        return Err(AxonError::PieceCorrupt {
            item: item.label(),
            index,
            path: path.to_path_buf(),
            reason,
        });
    }
    Ok(())
}

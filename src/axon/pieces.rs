//! [`check_item`]: the pieces on disk against the manifest's hashes; and
//! reading one piece, streamed or (small enough to store) whole.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::input::{open_input, MAX_PIECE_SIZE};
use super::{io_err, AxonError, AxonItem, ChunkState, Result};

/// The read buffer for streaming a piece: memory per piece, whatever its size.
const BUF: usize = 64 * 1024;

/// Hashes every piece of `item` on disk and says, per piece, whether it is the
/// piece the manifest names. Each file is streamed through SHA-256 with a
/// fixed buffer and never read past `chunk_size + 1` bytes.
///
/// A missing file is [`ChunkState::Missing`]; a file with the wrong length or
/// hash is [`ChunkState::Corrupt`]. Other I/O failures (permissions, a
/// directory, FIFO or symbolic link where a file should be, a folder leading
/// out of the backup) are errors, since they say nothing about the backup's
/// content; so is a `chunk_size` over [`MAX_PIECE_SIZE`].
pub fn check_item(item: &AxonItem) -> Result<Vec<ChunkState>> {
    check_piece_size(item)?;
    let mut buf = vec![0u8; BUF];
    let mut states = Vec::with_capacity(item.chunk_paths.len());
    for (index, path) in item.chunk_paths.iter().enumerate() {
        let state = match open_input(&item.root, path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => ChunkState::Missing,
            Err(e) => return Err(io_err(path, "cannot open chunk", e)),
            Ok(file) => {
                let (len, actual) = stream(item, path, file, &mut buf, &mut |_| Ok(()))?;
                match piece_problem(item, index, len, actual) {
                    None => ChunkState::Ok,
                    Some(reason) => ChunkState::Corrupt { reason },
                }
            }
        };
        states.push(state);
    }
    Ok(states)
}

/// Refuse an item whose pieces may be larger than bitsync reads.
pub(super) fn check_piece_size(item: &AxonItem) -> Result<()> {
    let cs = item.manifest.chunk_size;
    if cs > MAX_PIECE_SIZE {
        return Err(AxonError::BadItem {
            item: item.label(),
            problem: format!(
                "its chunk_size is {cs} bytes, more than the {MAX_PIECE_SIZE} bytes bitsync reads per piece \
                 (Axon writes 262144); refused"
            ),
        });
    }
    Ok(())
}

/// Stream `file` (at most `chunk_size + 1` bytes) through SHA-256, giving each
/// block to `sink`; returns the length read and the hash.
fn stream(
    item: &AxonItem,
    path: &Path,
    file: File,
    buf: &mut [u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<(u64, [u8; 32])> {
    let mut reader = file.take(u64::from(item.manifest.chunk_size) + 1);
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "cannot read chunk", e)),
        };
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
        len += n as u64;
    }
    Ok((len, hasher.finalize().into()))
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

fn open_piece(item: &AxonItem, index: usize, path: &Path) -> Result<File> {
    check_piece_size(item)?;
    match open_input(&item.root, path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AxonError::PieceMissing {
            item: item.label(),
            index,
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(path, "cannot open chunk", e)),
    }
}

fn checked(item: &AxonItem, index: usize, path: &Path, len: u64, actual: [u8; 32]) -> Result<()> {
    match piece_problem(item, index, len, actual) {
        None => Ok(()),
        Some(reason) => Err(AxonError::PieceCorrupt {
            item: item.label(),
            index,
            path: path.to_path_buf(),
            reason,
        }),
    }
}

/// Stream piece `index` through `sink` in blocks of 64 KiB, then check it
/// against the manifest (an error after the last block if it is not the
/// piece named: what `sink` got must then be discarded). Returns its length.
pub(super) fn stream_piece(
    item: &AxonItem,
    index: usize,
    path: &Path,
    buf: &mut [u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let file = open_piece(item, index, path)?;
    let (len, actual) = stream(item, path, file, buf, sink)?;
    checked(item, index, path, len, actual)?;
    Ok(len)
}

/// Piece `index`, read whole and checked against the manifest: for storing a
/// piece as a chunk, so only for items whose `chunk_size` the chunk store
/// takes (at most `chunk_size + 1` bytes are read, and never more than
/// [`MAX_PIECE_SIZE`]).
pub(crate) fn read_piece(item: &AxonItem, index: usize) -> Result<Vec<u8>> {
    let path = item
        .chunk_paths
        .get(index)
        .ok_or_else(|| AxonError::BadItem {
            item: item.label(),
            problem: format!("the manifest has no piece {index}"),
        })?;
    let file = open_piece(item, index, path)?;
    let hint = file
        .metadata()
        .map(|m| m.len().min(u64::from(item.manifest.chunk_size) + 1))
        .unwrap_or(0);
    let mut data = Vec::with_capacity(hint as usize);
    let mut buf = vec![0u8; BUF];
    let (len, actual) = stream(item, path, file, &mut buf, &mut |b| {
        data.extend_from_slice(b);
        Ok(())
    })?;
    checked(item, index, path, len, actual)?;
    Ok(data)
}

//! Deterministic test data, and reading or damaging what a node wrote to disk.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use bitsync::crypto::Hash;

/// A xorshift64 stream: cheap even in a debug build, incompressible, and the
/// same for the same seed on every run.
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Xorshift {
        Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            c.copy_from_slice(&self.0.to_le_bytes()[..c.len()]);
        }
    }
}

/// `len` deterministic, non-repeating bytes; different seeds give different bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Xorshift::new(seed).fill(&mut v);
    v
}

/// A reader of `len` deterministic bytes generated on the fly, for items too
/// large to hold in memory (benches).
pub struct DataReader {
    left: u64,
    rng: Xorshift,
}

impl DataReader {
    pub fn new(seed: u64, len: u64) -> DataReader {
        DataReader {
            left: len,
            rng: Xorshift::new(seed),
        }
    }
}

impl Read for DataReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.rng.fill(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Change one byte of a file in place (`at` past the end: the last byte).
#[track_caller]
pub fn flip_byte(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let i = at.min(b.len() - 1);
    b[i] ^= 0x55;
    fs::write(path, b).unwrap();
}

/// Where a chunk store rooted at `root` (a data dir's `chunks/`, or a backup
/// repository's) keeps chunk `id`.
pub fn chunk_file(root: &Path, id: &Hash) -> PathBuf {
    let h = id.to_hex();
    root.join(&h[..2]).join(h)
}

/// Every chunk file under `<data_dir>/chunks/xx/`, not counting `chunks/tmp/`; sorted.
pub fn chunk_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = fs::read_dir(data_dir.join("chunks")) else {
        return out;
    };
    for d in dirs.flatten() {
        if d.file_name() == "tmp" || !d.path().is_dir() {
            continue;
        }
        for f in fs::read_dir(d.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

/// Names of the entries of a directory (not recursive; none if it is missing).
pub fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file under `dir`, recursively, sorted (directories not listed; a
/// missing `dir` has none).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every file under `dir`, recursively (directories not counted).
pub fn count_files(dir: &Path) -> usize {
    walk(dir).len()
}

/// Every file under `dir` with its bytes, by relative path, sorted.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_default();
            (p.strip_prefix(dir).unwrap().to_path_buf(), bytes)
        })
        .collect()
}

//! `bitsync backup verify` (every file and chunk a snapshot needs, re-hashed),
//! and the checks a restore makes on a snapshot's own files first.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use super::super::fsync_file;
use super::{chunk_list, hash_file, FileEntry, Repo, SnapshotMeta, DB_FILE, SNAPSHOT_FILE};
use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, IoContext, Kind, Result};
use crate::store::{self, Db};

/// What `backup verify` found.
#[derive(Debug, Default)]
pub(crate) struct VerifyReport {
    pub(crate) snapshots: Vec<String>,
    pub(crate) files_checked: u64,
    pub chunks_checked: u64,
    pub(crate) bytes_checked: u64,
    /// One line per problem, naming the file (relative to the repository).
    pub problems: Vec<String>,
}

/// Chunks already hashed (with the problem found, if any), so a chunk shared
/// by several snapshots is read once; and the progress made.
struct ChunkCheck {
    checked: HashMap<ChunkId, Option<String>>,
    done: u64,
    total: u64,
    buf: Vec<u8>,
}

/// Re-hash every file the chosen snapshot (or every snapshot) needs and run
/// `PRAGMA integrity_check` on its database. Problems are collected, not fatal.
pub(crate) fn verify(
    repo_root: &Path,
    snapshot: Option<&str>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<VerifyReport> {
    let repo = Repo::open(repo_root)?;
    let _lock = repo.lock_shared()?;
    let mut report = VerifyReport::default();
    let metas = match snapshot {
        Some(s) => vec![repo.find(Some(s))?],
        None => {
            let (all, bad) = repo.list()?;
            for (name, e) in bad {
                report.problems.push(format!("snapshots/{name}: {e}"));
            }
            if all.is_empty() && report.problems.is_empty() {
                return Err(Error::not_found(format!(
                    "backup repository {} has no snapshots yet",
                    repo.name()
                )));
            }
            all
        }
    };
    let mut chunks = ChunkCheck {
        checked: HashMap::new(),
        done: 0,
        total: metas.iter().map(|m| m.counts.chunk_bytes).sum(),
        buf: Vec::new(),
    };
    for m in &metas {
        report.snapshots.push(m.id.clone());
        repo.fetch_files(m)?;
        let dir = repo.snapshot_dir(&m.id);
        check_listed_files(&mut report, &dir, m);
        let db = dir.join(DB_FILE);
        if db.is_file() {
            check_database(&mut report, &db, m);
        }
        check_chunks(&mut report, &repo, m, &mut chunks, progress);
    }
    Ok(report)
}

/// Each file snapshot.json lists, re-hashed; and the files it must list.
fn check_listed_files(report: &mut VerifyReport, dir: &Path, m: &SnapshotMeta) {
    let rel = |name: &str| format!("snapshots/{}/{name}", m.id);
    let mut listed: BTreeMap<&str, &FileEntry> = BTreeMap::new();
    for f in &m.files {
        listed.insert(f.path.as_str(), f);
        report.files_checked += 1;
        if !super::is_plain_name(&f.path) {
            report.problems.push(format!(
                "{}: snapshot.json lists a file outside the snapshot",
                rel(&f.path)
            ));
            continue;
        }
        match hash_file(&dir.join(&f.path)) {
            Err(e) if e.kind() == Kind::NotFound => {
                report.problems.push(format!("{}: missing", rel(&f.path)))
            }
            Err(e) => report.problems.push(format!("{}: {e}", rel(&f.path))),
            Ok((h, size)) => {
                if size != f.size || h.to_hex() != f.sha256 {
                    report.problems.push(format!(
                        "{}: damaged: SHA-256 {h} ({size} bytes), snapshot.json says {} ({} bytes)",
                        rel(&f.path),
                        f.sha256,
                        f.size
                    ));
                }
            }
        }
    }
    if !listed.contains_key(DB_FILE) {
        report.problems.push(format!(
            "{}: snapshot.json lists no database",
            rel(SNAPSHOT_FILE)
        ));
    }
    if let Some(id) = &m.identity {
        if !listed.contains_key(id.file.as_str()) {
            report.problems.push(format!(
                "{}: the sealed node key is not among the listed files",
                rel(SNAPSHOT_FILE)
            ));
        }
        if let Some(f) = &id.kem_key {
            if !listed.contains_key(f.as_str()) {
                report.problems.push(format!(
                    "{}: the sealed ML-KEM key is not among the listed files",
                    rel(SNAPSHOT_FILE)
                ));
            }
        }
        if let Some(f) = &id.onion_keys {
            if !listed.contains_key(f.as_str()) {
                report.problems.push(format!(
                    "{}: the sealed onion keys are not among the listed files",
                    rel(SNAPSHOT_FILE)
                ));
            }
        }
    }
}

/// The database: PRAGMA integrity_check, then it must agree with snapshot.json.
fn check_database(report: &mut VerifyReport, db: &Path, m: &SnapshotMeta) {
    let rel = format!("snapshots/{}/{DB_FILE}", m.id);
    match store::integrity_problems(db) {
        Ok(lines) => {
            for l in lines {
                report.problems.push(format!("{rel}: integrity_check: {l}"));
            }
        }
        Err(e) => report.problems.push(format!("{rel}: {e}")),
    }
    match Db::open_read_only(db).and_then(|d| d.facts()) {
        Ok(f) => {
            if f.node_id.to_hex() != m.node_id {
                report.problems.push(format!(
                    "{rel}: node id {} differs from snapshot.json's {}",
                    f.node_id, m.node_id
                ));
            }
            let in_db: Vec<(String, u64)> =
                f.chunks.iter().map(|(c, s)| (c.to_hex(), *s)).collect();
            if in_db != m.chunks {
                report.problems.push(format!(
                    "{rel}: lists {} chunks, snapshot.json lists {}: one of the two is damaged",
                    in_db.len(),
                    m.chunks.len()
                ));
            }
        }
        Err(e) => report.problems.push(format!("{rel}: {e}")),
    }
}

/// Every chunk, hashed once however many snapshots share it.
fn check_chunks(
    report: &mut VerifyReport,
    repo: &Repo,
    m: &SnapshotMeta,
    chunks: &mut ChunkCheck,
    progress: &(dyn Fn(u64, u64) + Sync),
) {
    let list = match chunk_list(m) {
        Ok(l) => l,
        Err(e) => {
            report
                .problems
                .push(format!("snapshots/{}/{SNAPSHOT_FILE}: {e}", m.id));
            Vec::new()
        }
    };
    for (id, size) in list {
        if let Some(result) = chunks.checked.get(&id) {
            if let Some(p) = result {
                report
                    .problems
                    .push(format!("{p} (also needed by snapshot {})", m.id));
            }
            continue;
        }
        let result = check_chunk(repo, m, &id, size, &mut chunks.buf);
        if let Some(p) = &result {
            report.problems.push(p.clone());
        }
        chunks.checked.insert(id, result);
        report.chunks_checked += 1;
        report.bytes_checked += size;
        chunks.done += size;
        progress(chunks.done, chunks.total);
    }
}

/// The problem with one chunk of the repository, if any.
fn check_chunk(
    repo: &Repo,
    m: &SnapshotMeta,
    id: &ChunkId,
    size: u64,
    buf: &mut Vec<u8>,
) -> Option<String> {
    let relp = format!("chunks/{}/{}", &id.to_hex()[..2], id.to_hex());
    match repo.read_chunk(id, size, buf) {
        Ok(()) => None,
        Err(e) if e.kind() == Kind::NotFound => {
            Some(format!("{relp}: missing (needed by snapshot {})", m.id))
        }
        Err(e) if e.kind() == Kind::Integrity => Some(format!(
            "{relp}: damaged: {} (needed by snapshot {})",
            if buf.is_empty() {
                "wrong size".to_string()
            } else {
                format!("SHA-256 is {}", Hash::of(&buf[..]))
            },
            m.id
        )),
        Err(e) => Some(format!("{relp}: {e}")),
    }
}

/// Check a snapshot's own files (not its chunks) and its database before a
/// restore. Returns the problems found.
pub(crate) fn verify_files(repo: &Repo, m: &SnapshotMeta) -> Result<Vec<String>> {
    let dir = repo.snapshot_dir(&m.id);
    let mut problems = Vec::new();
    for f in &m.files {
        let rel = format!("snapshots/{}/{}", m.id, f.path);
        if !super::is_plain_name(&f.path) {
            problems.push(format!("{rel}: listed outside the snapshot"));
            continue;
        }
        match hash_file(&dir.join(&f.path)) {
            Err(e) if e.kind() == Kind::NotFound => problems.push(format!("{rel}: missing")),
            Err(e) => problems.push(format!("{rel}: {e}")),
            Ok((h, size)) if size != f.size || h.to_hex() != f.sha256 => problems.push(format!(
                "{rel}: damaged (SHA-256 {h}, snapshot.json says {})",
                f.sha256
            )),
            Ok(_) => {}
        }
    }
    let db = dir.join(DB_FILE);
    if !m.files.iter().any(|f| f.path == DB_FILE) {
        problems.push(format!(
            "snapshots/{}/{SNAPSHOT_FILE}: lists no database",
            m.id
        ));
    } else if problems.is_empty() {
        for l in store::integrity_problems(&db)? {
            problems.push(format!(
                "snapshots/{}/{DB_FILE}: integrity_check: {l}",
                m.id
            ));
        }
        if problems.is_empty() {
            let f = Db::open_read_only(&db)?.facts()?;
            let in_db: Vec<(String, u64)> =
                f.chunks.iter().map(|(c, s)| (c.to_hex(), *s)).collect();
            if in_db != m.chunks || f.node_id.to_hex() != m.node_id {
                problems.push(format!(
                    "snapshots/{}/{DB_FILE}: does not match snapshot.json",
                    m.id
                ));
            }
        }
    }
    Ok(problems)
}

/// Copy one snapshot file to `dst` (new), checking it against its entry as it goes, and fsync it.
pub(crate) fn copy_file_verified(src: &Path, dst: &Path, expect: &FileEntry) -> Result<()> {
    use std::io::{Read, Write};
    let mut f = super::open_snapshot_file(src)?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .ctx(format!("creating {}", dst.display()))?;
    let mut h = crate::crypto::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).ctx(format!("reading {}", src.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        out.write_all(&buf[..k])
            .ctx(format!("writing {}", dst.display()))?;
        n += k as u64;
    }
    out.sync_all().ctx(format!("syncing {}", dst.display()))?;
    let got = h.finish().to_hex();
    if got != expect.sha256 || n != expect.size {
        return Err(Error::integrity(format!(
            "{} changed while it was copied (SHA-256 {got})",
            src.display()
        )));
    }
    drop(out);
    fsync_file(dst)
}

//! `bitsync backup`: a new snapshot of a data dir, built under `tmp/` and
//! renamed into `snapshots/` once everything it needs is durable.

use std::fs;
use std::path::Path;
use std::time::{Instant, SystemTime};

use rand::Rng;

use super::super::copy::{self, CopyJob, CopyStats};
use super::super::{dbcopy, fsync_dir, syncfs, write_atomic, TempTree};
use super::prune::{prune, PruneOutcome};
use super::{
    file_entry, sealed, Counts, FileEntry, IdentityInfo, Repo, SnapshotMeta, CONFIG_FILE, DB_FILE,
    SNAPSHOT_FILE, SNAPSHOT_FORMAT, SNAPSHOT_VERSION,
};
use crate::crypto::NodeId;
use crate::error::{Error, IoContext, Kind, Result};
use crate::identity::Identity;
use crate::node::Paths;
use crate::store::{self, Db, DbFacts};

/// The node key to put in a snapshot.
pub(crate) struct WithIdentity<'a> {
    pub(crate) identity: &'a Identity,
    pub(crate) passphrase: &'a str,
    pub(crate) sealed_on_node: bool,
}

pub(crate) struct BackupOptions<'a> {
    pub(crate) keep_last: Option<usize>,
    pub(crate) identity: Option<WithIdentity<'a>>,
}

/// What a backup run did.
#[derive(Debug, Clone)]
pub(crate) struct BackupOutcome {
    pub(crate) snapshot: SnapshotMeta,
    pub(crate) new_chunks: CopyStats,
    pub(crate) pruned: Option<PruneOutcome>,
}

/// Read the node id of a data dir's database (without opening the node key).
pub(crate) fn data_dir_node_id(data_dir: &Path) -> Result<NodeId> {
    let paths = Paths::new(data_dir);
    if !paths.db().is_file() {
        return Err(Error::not_found(format!(
            "no bitsync data dir at {} (there is no {}): pass --data-dir",
            data_dir.display(),
            paths.db().display()
        )));
    }
    Db::open_read_only(&paths.db())?.node_id()
}

/// Add a snapshot of the data dir at `data_dir` to the repository at `repo_root`
/// (created if missing). The node may be running and writing meanwhile.
pub(crate) fn backup(
    data_dir: &Path,
    repo_root: &Path,
    opts: &BackupOptions<'_>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<BackupOutcome> {
    let paths = Paths::new(data_dir);
    let node_id = data_dir_node_id(data_dir)?;
    let bucket = crate::backup::bucket_of(data_dir, false)?;
    check_options(&paths, opts, &node_id)?;
    let repo = Repo::open_or_create(repo_root)?;
    if repo.is_remote() && opts.keep_last.is_some() {
        return Err(Error::invalid(format!(
            "--keep-last is not supported for a repository in an object store ({}): S3 has no lock, and pruning could delete a chunk that a backup running elsewhere is about to list",
            repo.name()
        )));
    }
    let _lock = repo.lock_exclusive()?;
    // Leftovers of interrupted runs: never visible, safe to clear under the writer's lock.
    clear_dir(&repo.tmp())?;

    let now = SystemTime::now();
    let id = new_snapshot_id(now);
    let staging = repo.tmp().join(&id);
    let mut guard = TempTree::new(staging.clone());
    fs::create_dir_all(&staging).ctx(format!("creating {}", staging.display()))?;

    // 1. The database, consistent as of one instant.
    let t0 = Instant::now();
    let facts = copy_database(&paths, &staging, &node_id)?;

    // 2. Configuration and (sealed) key.
    let mut files = vec![file_entry(&staging, DB_FILE)?];
    if paths.config().is_file() {
        let text = fs::read(paths.config()).ctx(format!("reading {}", paths.config().display()))?;
        write_atomic(&staging.join(CONFIG_FILE), &text, 0o600)?;
        files.push(file_entry(&staging, CONFIG_FILE)?);
    }
    let identity = match &opts.identity {
        Some(w) => Some(sealed::write_identity(w, &paths, &staging, &mut files)?),
        None => None,
    };

    // 3. Every chunk the database lists as present and the repository lacks.
    let t1 = Instant::now();
    let chunk_dir = paths.chunks();
    let src = match &bucket {
        Some(b) => copy::End::Store(b),
        None => copy::End::Dir(&chunk_dir),
    };
    let stats = copy_new_chunks(src, &repo, &id, &facts, progress)?;
    // Chunk files, the db copy and the key all durable before the snapshot
    // can appear (an object is durable once its PUT returns).
    let t2 = Instant::now();
    if !repo.is_remote() {
        syncfs(&repo.root)?;
    }
    tracing::debug!(
        db_ms = (t1 - t0).as_millis() as u64,
        chunks_ms = (t2 - t1).as_millis() as u64,
        syncfs_ms = t2.elapsed().as_millis() as u64,
        "backup phases"
    );

    // 4. The description, last; then the snapshot appears with one rename.
    let meta = snapshot_meta(id.clone(), &node_id, now, &facts, identity, files);
    write_atomic(
        &staging.join(SNAPSHOT_FILE),
        &serde_json::to_vec_pretty(&meta).expect("json"),
        0o600,
    )?;
    if let Some(remote) = repo.remote() {
        remote.publish(&id, &staging, &meta.files)?;
    } else {
        fsync_dir(&staging)?;
        let dest = repo.snapshot_dir(&id);
        fs::rename(&staging, &dest)
            .ctx(format!("moving the new snapshot into {}", dest.display()))?;
        guard.disarm();
        fsync_dir(&repo.snapshots())?;
    }

    let pruned = match opts.keep_last {
        Some(n) => Some(prune(&repo, n, &id)?),
        None => None,
    };
    Ok(BackupOutcome {
        snapshot: meta,
        new_chunks: stats,
        pruned,
    })
}

/// What can be refused before the repository is touched.
fn check_options(paths: &Paths, opts: &BackupOptions<'_>, node_id: &NodeId) -> Result<()> {
    if let Some(w) = &opts.identity {
        if w.identity.id() != *node_id {
            return Err(Error::integrity(format!(
                "node key {} ({}) does not belong to database {} ({node_id})",
                paths.key().display(),
                w.identity.id(),
                paths.db().display()
            )));
        }
    }
    if opts.keep_last == Some(0) {
        return Err(Error::invalid("--keep-last must be at least 1"));
    }
    Ok(())
}

/// The database copied into `staging`, checked, and what it says.
fn copy_database(paths: &Paths, staging: &Path, node_id: &NodeId) -> Result<DbFacts> {
    let db_copy = staging.join(DB_FILE);
    dbcopy::snapshot_db(&paths.db(), &db_copy)?;
    let problems = store::integrity_problems(&db_copy)?;
    if !problems.is_empty() {
        return Err(Error::integrity(format!(
            "the database copy fails PRAGMA integrity_check ({}); run `bitsync verify` on the node",
            problems.join("; ")
        )));
    }
    let facts = Db::open_read_only(&db_copy)?.facts()?;
    if facts.node_id != *node_id {
        return Err(Error::integrity(
            "the database's node id changed during the backup",
        ));
    }
    Ok(facts)
}

fn copy_new_chunks(
    src: copy::End<'_>,
    repo: &Repo,
    id: &str,
    facts: &DbFacts,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CopyStats> {
    let tmp_dir = repo.tmp().join(format!("chunks-{id}"));
    let (repo_chunks, store) = repo.chunk_end();
    // In an object store, one listing says what is there (a HEAD per chunk
    // would cost a round trip each).
    let present = repo.remote().map(|r| r.present_chunks()).transpose()?;
    let list: std::borrow::Cow<[_]> = match &present {
        Some(p) => facts
            .chunks
            .iter()
            .filter(|(c, size)| p.get(&c.to_hex()) != Some(size))
            .copied()
            .collect(),
        None => facts.chunks.as_slice().into(),
    };
    let job = CopyJob {
        src,
        dst: store.map_or(copy::End::Dir(&repo_chunks), copy::End::Store),
        tmp_dir: &tmp_dir,
        skip_existing: present.is_none(),
        src_label: "the data dir",
        staged: false,
        outside_src: false,
    };
    let already = (facts.chunks.len() - list.len()) as u64;
    let total: u64 = list.iter().map(|(_, size)| size).sum();
    let mut stats = copy::copy_chunks(&job, &list, &|done| progress(done, total)).map_err(|e| match e.kind() {
        Kind::Integrity | Kind::NotFound => e.context("backup stopped (run `bitsync verify` on the node, which quarantines damaged chunks, then back up again)"),
        _ => e,
    })?;
    let _ = fs::remove_dir_all(&tmp_dir);
    stats.skipped += already;
    Ok(stats)
}

fn snapshot_meta(
    id: String,
    node_id: &NodeId,
    now: SystemTime,
    facts: &DbFacts,
    identity: Option<IdentityInfo>,
    files: Vec<FileEntry>,
) -> SnapshotMeta {
    SnapshotMeta {
        format: SNAPSHOT_FORMAT.into(),
        format_version: SNAPSHOT_VERSION,
        id,
        node_id: node_id.to_hex(),
        created_at_ms: now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        created_at: humantime::format_rfc3339_seconds(now).to_string(),
        bitsync_version: env!("CARGO_PKG_VERSION").into(),
        counts: Counts {
            manifests: facts.manifests,
            chunks: facts.chunks.len() as u64,
            chunk_bytes: facts.chunk_bytes(),
            head_seq: facts.head_seq,
            trusted_peers: facts.trusted_peers.len() as u64,
        },
        identity,
        files,
        chunks: facts.chunks.iter().map(|(c, s)| (c.to_hex(), *s)).collect(),
    }
}

fn new_snapshot_id(now: SystemTime) -> String {
    let t = humantime::format_rfc3339_seconds(now).to_string(); // 2026-11-23T19:05:12Z
    let compact: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{compact}-{:04x}", rand::thread_rng().gen::<u16>())
}

fn clear_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
    for e in fs::read_dir(dir)
        .ctx(format!("reading {}", dir.display()))?
        .flatten()
    {
        let p = e.path();
        let r = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.ctx(format!("removing the leftover {}", p.display()))?;
    }
    Ok(())
}

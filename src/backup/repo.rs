//! The backup repository: snapshots of an instance and the chunks they share.
//!
//! ```text
//! <repo>/bitsync-backup.json         marker: {"format": "bitsync-backup", "version": 1, ...}
//!        lock                        flock: exclusive while a backup runs, shared while reading
//!        chunks/<xx>/<64 hex>        encrypted chunks, named by SHA-256, shared by all snapshots
//!        snapshots/<id>/snapshot.json  what the snapshot is and the SHA-256 of every file it needs
//!        snapshots/<id>/bitsync.db     consistent copy of the database (rollback-journal mode)
//!        snapshots/<id>/config.toml    the node's configuration
//!        snapshots/<id>/node.key.sealed  with --with-identity: the node key, sealed (scrypt + AES-256-GCM)
//!        snapshots/<id>/onion.keys.sealed  with --with-identity, if the node has an onion service: its keys, sealed
//!        tmp/                        snapshots being built; cleared by the next backup
//! ```
//!
//! A snapshot is built in `tmp/<id>/` and renamed into `snapshots/` only after
//! its database copy, its files and every chunk it needs are on disk (fsync,
//! syncfs) and its `snapshot.json` was written last: an interrupted backup
//! leaves at most unreferenced chunks and a directory under `tmp/`, and every
//! earlier snapshot stays whole. `--keep-last` first makes old snapshots
//! vanish (one rename each), then removes only chunks no remaining snapshot
//! lists. The full format is in docs/FORMAT.md, "Backup repository".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::copy::{self, CopyJob, CopyStats};
use super::dbcopy;
use super::{fsync_dir, fsync_file, syncfs, write_atomic, FileLock};
use crate::crypto::{ChunkId, Hash, NodeId};
use crate::error::{Error, IoContext, Kind, Result};
use crate::identity::Identity;
use crate::node::Paths;

pub const MARKER: &str = "bitsync-backup.json";
pub const REPO_FORMAT: &str = "bitsync-backup";
pub const REPO_VERSION: u32 = 1;
pub const SNAPSHOT_FORMAT: &str = "bitsync-backup-snapshot";
pub const SNAPSHOT_VERSION: u32 = 1;
pub const SNAPSHOT_FILE: &str = "snapshot.json";
pub const DB_FILE: &str = "bitsync.db";
pub const CONFIG_FILE: &str = "config.toml";
pub const KEY_FILE: &str = "node.key.sealed";
pub const ONION_FILE: &str = "onion.keys.sealed";

#[derive(Serialize, Deserialize, Debug)]
struct Marker {
    format: String,
    version: u32,
    created_at_ms: i64,
}

/// `snapshot.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SnapshotMeta {
    pub format: String,
    pub format_version: u32,
    pub id: String,
    /// Hex node id of the instance backed up.
    pub node_id: String,
    pub created_at_ms: i64,
    /// RFC 3339, UTC, for people.
    pub created_at: String,
    pub bitsync_version: String,
    pub counts: Counts,
    /// Present when the snapshot holds the node key (sealed).
    pub identity: Option<IdentityInfo>,
    /// Every file of the snapshot directory except snapshot.json, with its SHA-256.
    pub files: Vec<FileEntry>,
    /// Every chunk the snapshot needs, as [id hex, bytes]; the id is the file's SHA-256.
    pub chunks: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Counts {
    pub manifests: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub head_seq: u64,
    pub trusted_peers: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct IdentityInfo {
    /// The file in the snapshot directory holding the sealed key.
    pub file: String,
    /// Whether the node's own key file was sealed (restore writes it back the same way).
    pub sealed_on_node: bool,
    pub kdf: String,
    /// The file holding the onion service's keys, sealed the same way (see
    /// [`super::onion`]); absent when the node never ran one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onion_keys: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Readable snapshots (oldest first), and unreadable snapshot directories with why.
pub type SnapshotList = (Vec<SnapshotMeta>, Vec<(String, Error)>);

/// An opened backup repository.
pub struct Repo {
    pub root: PathBuf,
}

impl Repo {
    pub fn chunks(&self) -> PathBuf {
        self.root.join("chunks")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots().join(id)
    }

    /// Open an existing repository.
    pub fn open(root: &Path) -> Result<Repo> {
        let marker = root.join(MARKER);
        let text = match fs::read(&marker) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found(if root.is_dir() {
                    format!(
                        "{} is not a bitsync backup repository (it has no {MARKER})",
                        root.display()
                    )
                } else {
                    format!("no backup repository at {}", root.display())
                }))
            }
            Err(e) => return Err(Error::from_io(e, format!("reading {}", marker.display()))),
        };
        let m: Marker = serde_json::from_slice(&text).map_err(|e| {
            Error::integrity(format!(
                "{} is damaged ({e}); is {} a backup repository?",
                marker.display(),
                root.display()
            ))
        })?;
        if m.format != REPO_FORMAT {
            return Err(Error::not_found(format!(
                "{} is not a bitsync backup repository",
                root.display()
            )));
        }
        if m.version > REPO_VERSION {
            return Err(Error::invalid(format!(
                "{} has repository format version {}; this bitsync reads up to {REPO_VERSION}",
                root.display(),
                m.version
            )));
        }
        Ok(Repo {
            root: root.to_path_buf(),
        })
    }

    /// Open a repository, creating it if `root` is missing or an empty directory.
    pub fn open_or_create(root: &Path) -> Result<Repo> {
        if root.join(MARKER).exists() {
            return Repo::open(root);
        }
        if !super::is_missing_or_empty_dir(root)? {
            return Err(Error::exists(format!(
                "{} exists and is not a bitsync backup repository; choose an empty or new directory",
                root.display()
            )));
        }
        super::create_private_dir(root)?;
        for d in ["chunks", "snapshots", "tmp"] {
            fs::create_dir_all(root.join(d)).ctx(format!("creating {}", root.join(d).display()))?;
        }
        let m = Marker {
            format: REPO_FORMAT.into(),
            version: REPO_VERSION,
            created_at_ms: crate::manifest::now_ms(),
        };
        // The marker is written last: a repository without one was never finished.
        write_atomic(
            &root.join(MARKER),
            &serde_json::to_vec_pretty(&m).expect("json"),
            0o600,
        )?;
        if let Some(p) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(p)?;
        }
        Repo::open(root)
    }

    fn lock(&self, exclusive: bool) -> Result<FileLock> {
        FileLock::try_lock(
            &self.root.join("lock"),
            exclusive,
            &format!(
                "backup repository {} is in use by another bitsync (a backup or prune holds it); run the command again when it is done",
                self.root.display()
            ),
        )
    }

    /// Take the writer's lock (backups, pruning).
    pub fn lock_exclusive(&self) -> Result<FileLock> {
        self.lock(true)
    }
    /// Take a reader's lock (verify, restore, clone --from-backup).
    pub fn lock_shared(&self) -> Result<FileLock> {
        self.lock(false)
    }

    /// Every finished snapshot, oldest first. Directories that cannot be read
    /// are returned as errors in the second list (`backup verify` reports them).
    pub fn list(&self) -> Result<SnapshotList> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let dir = self.snapshots();
        let entries = fs::read_dir(&dir).ctx(format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e.ctx(format!("reading {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            match read_meta(&e.path()) {
                Ok(m) if m.id == name => ok.push(m),
                Ok(m) => bad.push((
                    name.clone(),
                    Error::integrity(format!("snapshot.json names snapshot {:?}", m.id)),
                )),
                Err(err) => bad.push((name, err)),
            }
        }
        ok.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        bad.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((ok, bad))
    }

    /// Find a snapshot by id, unique id prefix, or `latest` (also: none given).
    pub fn find(&self, wanted: Option<&str>) -> Result<SnapshotMeta> {
        let (all, _) = self.list()?;
        let wanted = wanted
            .map(str::trim)
            .filter(|w| !w.is_empty() && *w != "latest");
        let Some(w) = wanted else {
            return all.into_iter().last().ok_or_else(|| {
                Error::not_found(format!(
                    "backup repository {} has no snapshots yet",
                    self.root.display()
                ))
            });
        };
        if let Some(m) = all.iter().find(|m| m.id == w) {
            return Ok(m.clone());
        }
        let matches: Vec<_> = all.iter().filter(|m| m.id.starts_with(w)).collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::not_found(format!(
                "no snapshot {w:?} in {} (see `bitsync backup ls --repo {}`)",
                self.root.display(),
                self.root.display()
            ))),
            _ => Err(Error::invalid(format!(
                "snapshot {w:?} is ambiguous: {} snapshots start with it",
                matches.len()
            ))),
        }
    }
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta> {
    let p = dir.join(SNAPSHOT_FILE);
    let text = fs::read(&p).ctx(format!("reading {}", p.display()))?;
    let m: SnapshotMeta = serde_json::from_slice(&text)
        .map_err(|e| Error::integrity(format!("{} is damaged: {e}", p.display())))?;
    if m.format != SNAPSHOT_FORMAT {
        return Err(Error::integrity(format!(
            "{} is not a bitsync snapshot description",
            p.display()
        )));
    }
    if m.format_version > SNAPSHOT_VERSION {
        return Err(Error::invalid(format!(
            "{} has snapshot format version {}; this bitsync reads up to {SNAPSHOT_VERSION}",
            p.display(),
            m.format_version
        )));
    }
    Ok(m)
}

/// Parse the chunk list of a snapshot.
pub fn chunk_list(m: &SnapshotMeta) -> Result<Vec<(ChunkId, u64)>> {
    m.chunks
        .iter()
        .map(|(id, size)| {
            Hash::parse(id, "chunk id")
                .map(|h| (h, *size))
                .map_err(|_| {
                    Error::integrity(format!("snapshot {}: chunk id {id:?} is malformed", m.id))
                })
        })
        .collect()
}

/// SHA-256 and length of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(Hash, u64)> {
    use std::io::Read;
    let mut f = fs::File::open(path).ctx(format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .ctx(format!("reading {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((Hash(h.finalize().into()), n))
}

fn file_entry(dir: &Path, name: &str) -> Result<FileEntry> {
    let (h, size) = hash_file(&dir.join(name))?;
    Ok(FileEntry {
        path: name.to_string(),
        size,
        sha256: h.to_hex(),
    })
}

fn new_snapshot_id(now: std::time::SystemTime) -> String {
    let t = humantime::format_rfc3339_seconds(now).to_string(); // 2026-11-23T19:05:12Z
    let compact: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{compact}-{:04x}", rand::thread_rng().gen::<u16>())
}

/// The node key to put in a snapshot.
pub struct WithIdentity<'a> {
    pub identity: &'a Identity,
    pub passphrase: &'a str,
    pub sealed_on_node: bool,
}

pub struct BackupOptions<'a> {
    pub keep_last: Option<usize>,
    pub identity: Option<WithIdentity<'a>>,
}

/// What a backup run did.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    pub snapshot: SnapshotMeta,
    pub new_chunks: CopyStats,
    pub pruned: Option<PruneOutcome>,
}

#[derive(Debug, Clone, Default)]
pub struct PruneOutcome {
    pub removed_snapshots: Vec<String>,
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    /// Chunk removal was skipped because a remaining snapshot could not be read.
    pub chunk_gc_skipped: Option<String>,
}

/// Read the node id of a data dir's database (without opening the node key).
pub fn data_dir_node_id(data_dir: &Path) -> Result<NodeId> {
    let paths = Paths::new(data_dir);
    if !paths.db().is_file() {
        return Err(Error::not_found(format!(
            "no bitsync data dir at {} (there is no {}): pass --data-dir",
            data_dir.display(),
            paths.db().display()
        )));
    }
    let c = dbcopy::open_read_only(&paths.db())?;
    let id: String = c
        .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
            r.get(0)
        })
        .map_err(|e| {
            Error::from(e).context(format!(
                "{} is not a bitsync database",
                paths.db().display()
            ))
        })?;
    Hash::parse(&id, "node id")
}

/// Add a snapshot of the data dir at `data_dir` to the repository at `repo_root`
/// (created if missing). The node may be running and writing meanwhile.
pub fn backup(
    data_dir: &Path,
    repo_root: &Path,
    opts: &BackupOptions<'_>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<BackupOutcome> {
    let paths = Paths::new(data_dir);
    let node_id = data_dir_node_id(data_dir)?;
    if let Some(w) = &opts.identity {
        if w.identity.id() != node_id {
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
    let repo = Repo::open_or_create(repo_root)?;
    let _lock = repo.lock_exclusive()?;
    // Leftovers of interrupted runs: never visible, safe to clear under the writer's lock.
    clear_dir(&repo.tmp())?;

    let now = std::time::SystemTime::now();
    let id = new_snapshot_id(now);
    let staging = repo.tmp().join(&id);
    let mut guard = super::TempTree::new(staging.clone());
    fs::create_dir_all(&staging).ctx(format!("creating {}", staging.display()))?;

    // 1. The database, consistent as of one instant.
    let db_copy = staging.join(DB_FILE);
    let t0 = std::time::Instant::now();
    dbcopy::snapshot_db(&paths.db(), &db_copy)?;
    let problems = dbcopy::integrity_problems(&db_copy)?;
    if !problems.is_empty() {
        return Err(Error::integrity(format!(
            "the database copy fails PRAGMA integrity_check ({}); run `bitsync verify` on the node",
            problems.join("; ")
        )));
    }
    let facts = dbcopy::facts(&db_copy)?;
    if facts.node_id != node_id {
        return Err(Error::integrity(
            "the database's node id changed during the backup",
        ));
    }

    // 2. Configuration and (sealed) key.
    let mut files = vec![file_entry(&staging, DB_FILE)?];
    if paths.config().is_file() {
        let text = fs::read(paths.config()).ctx(format!("reading {}", paths.config().display()))?;
        write_atomic(&staging.join(CONFIG_FILE), &text, 0o600)?;
        files.push(file_entry(&staging, CONFIG_FILE)?);
    }
    let identity = match &opts.identity {
        Some(w) => {
            let sealed = w.identity.key_file_bytes(Some(w.passphrase));
            write_atomic(&staging.join(KEY_FILE), &sealed, 0o600)?;
            files.push(file_entry(&staging, KEY_FILE)?);
            let onion_keys = match super::onion::bundle(&paths.tor())? {
                Some(plain) => {
                    let sealed = crate::crypto::seal(w.passphrase, &plain);
                    write_atomic(&staging.join(ONION_FILE), &sealed, 0o600)?;
                    files.push(file_entry(&staging, ONION_FILE)?);
                    Some(ONION_FILE.to_string())
                }
                None => None,
            };
            Some(IdentityInfo {
                file: KEY_FILE.to_string(),
                sealed_on_node: w.sealed_on_node,
                kdf: "scrypt(log_n=15,r=8,p=1)+AES-256-GCM".into(),
                onion_keys,
            })
        }
        None => None,
    };

    // 3. Every chunk the database lists as present and the repository lacks.
    let total = facts.chunk_bytes();
    let job = CopyJob {
        src_root: &paths.chunks(),
        dst_root: &repo.chunks(),
        tmp_dir: &repo.tmp().join(format!("chunks-{id}")),
        skip_existing: true,
        src_label: "the data dir",
        staged: false,
    };
    let t1 = std::time::Instant::now();
    let stats = copy::copy_chunks(&job, &facts.chunks, &|done| progress(done, total)).map_err(|e| match e.kind() {
        Kind::Integrity | Kind::NotFound => e.context("backup stopped (run `bitsync verify` on the node, which quarantines damaged chunks, then back up again)"),
        _ => e,
    })?;
    let _ = fs::remove_dir_all(repo.tmp().join(format!("chunks-{id}")));
    // Chunk files, the db copy and the key all durable before the snapshot can appear.
    let t2 = std::time::Instant::now();
    syncfs(&repo.root)?;
    tracing::debug!(
        db_ms = (t1 - t0).as_millis() as u64,
        chunks_ms = (t2 - t1).as_millis() as u64,
        syncfs_ms = t2.elapsed().as_millis() as u64,
        "backup phases"
    );

    // 4. The description, last; then the snapshot appears with one rename.
    let meta = SnapshotMeta {
        format: SNAPSHOT_FORMAT.into(),
        format_version: SNAPSHOT_VERSION,
        id: id.clone(),
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
            chunk_bytes: total,
            head_seq: facts.head_seq,
            trusted_peers: facts.trusted_peers.len() as u64,
        },
        identity,
        files,
        chunks: facts.chunks.iter().map(|(c, s)| (c.to_hex(), *s)).collect(),
    };
    write_atomic(
        &staging.join(SNAPSHOT_FILE),
        &serde_json::to_vec_pretty(&meta).expect("json"),
        0o600,
    )?;
    fsync_dir(&staging)?;
    let dest = repo.snapshot_dir(&id);
    fs::rename(&staging, &dest).ctx(format!("moving the new snapshot into {}", dest.display()))?;
    guard.disarm();
    fsync_dir(&repo.snapshots())?;

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

/// Keep the newest `keep` snapshots (always including `just_made`), then
/// remove every chunk none of them lists. Caller holds the exclusive lock.
fn prune(repo: &Repo, keep: usize, just_made: &str) -> Result<PruneOutcome> {
    let (all, unreadable) = repo.list()?;
    let mut out = PruneOutcome::default();
    let mut newest_first: Vec<&SnapshotMeta> = all.iter().rev().collect();
    if let Some(pos) = newest_first.iter().position(|m| m.id == just_made) {
        let m = newest_first.remove(pos);
        newest_first.insert(0, m);
    }
    let (kept, gone) = newest_first.split_at(keep.min(newest_first.len()));
    for m in gone {
        // Vanish with one rename, then delete at leisure.
        let from = repo.snapshot_dir(&m.id);
        let to = repo.tmp().join(format!("deleting-{}", m.id));
        fs::rename(&from, &to).ctx(format!("removing snapshot {}", m.id))?;
        out.removed_snapshots.push(m.id.clone());
    }
    fsync_dir(&repo.snapshots())?;
    for m in gone {
        let _ = fs::remove_dir_all(repo.tmp().join(format!("deleting-{}", m.id)));
    }
    if let Some((name, e)) = unreadable.first() {
        out.chunk_gc_skipped = Some(format!(
            "snapshot {name} could not be read ({e}), so no chunk was removed; run `bitsync backup verify`"
        ));
        return Ok(out);
    }
    let mut needed: HashSet<String> = HashSet::new();
    for m in kept {
        for (c, _) in &m.chunks {
            needed.insert(c.clone());
        }
    }
    let root = repo.chunks();
    for sub in fs::read_dir(&root)
        .ctx(format!("reading {}", root.display()))?
        .flatten()
    {
        if !sub.path().is_dir() {
            continue;
        }
        for f in fs::read_dir(sub.path())
            .ctx(format!("reading {}", sub.path().display()))?
            .flatten()
        {
            let name = f.file_name().to_string_lossy().to_string();
            if name.len() == 64 && !needed.contains(&name) {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(f.path()).ctx(format!("removing {}", f.path().display()))?;
                out.removed_chunks += 1;
                out.removed_bytes += size;
            }
        }
    }
    Ok(out)
}

/// What `backup verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub snapshots: Vec<String>,
    pub files_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// One line per problem, naming the file (relative to the repository).
    pub problems: Vec<String>,
}

/// Re-hash every file the chosen snapshot (or every snapshot) needs and run
/// `PRAGMA integrity_check` on its database. Problems are collected, not fatal.
pub fn verify(
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
                    repo.root.display()
                )));
            }
            all
        }
    };
    let total: u64 = metas.iter().map(|m| m.counts.chunk_bytes).sum();
    let mut checked: HashMap<ChunkId, Option<String>> = HashMap::new();
    let mut done = 0u64;
    let mut buf = Vec::new();
    for m in &metas {
        report.snapshots.push(m.id.clone());
        let dir = repo.snapshot_dir(&m.id);
        let rel = |name: &str| format!("snapshots/{}/{name}", m.id);
        let mut listed: BTreeMap<&str, &FileEntry> = BTreeMap::new();
        for f in &m.files {
            listed.insert(f.path.as_str(), f);
            report.files_checked += 1;
            if f.path.contains('/') || f.path.starts_with('.') {
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
            if let Some(f) = &id.onion_keys {
                if !listed.contains_key(f.as_str()) {
                    report.problems.push(format!(
                        "{}: the sealed onion keys are not among the listed files",
                        rel(SNAPSHOT_FILE)
                    ));
                }
            }
        }
        // The database: PRAGMA integrity_check, then it must agree with snapshot.json.
        let db = dir.join(DB_FILE);
        if db.is_file() {
            match dbcopy::integrity_problems(&db) {
                Ok(lines) => {
                    for l in lines {
                        report
                            .problems
                            .push(format!("{}: integrity_check: {l}", rel(DB_FILE)));
                    }
                }
                Err(e) => report.problems.push(format!("{}: {e}", rel(DB_FILE))),
            }
            match dbcopy::facts(&db) {
                Ok(f) => {
                    if f.node_id.to_hex() != m.node_id {
                        report.problems.push(format!(
                            "{}: node id {} differs from snapshot.json's {}",
                            rel(DB_FILE),
                            f.node_id,
                            m.node_id
                        ));
                    }
                    let in_db: Vec<(String, u64)> =
                        f.chunks.iter().map(|(c, s)| (c.to_hex(), *s)).collect();
                    if in_db != m.chunks {
                        report.problems.push(format!(
                            "{}: lists {} chunks, snapshot.json lists {}: one of the two is damaged",
                            rel(DB_FILE),
                            in_db.len(),
                            m.chunks.len()
                        ));
                    }
                }
                Err(e) => report.problems.push(format!("{}: {e}", rel(DB_FILE))),
            }
        }
        // Every chunk, hashed once however many snapshots share it.
        let list = match chunk_list(m) {
            Ok(l) => l,
            Err(e) => {
                report.problems.push(format!("{}: {e}", rel(SNAPSHOT_FILE)));
                Vec::new()
            }
        };
        for (id, size) in list {
            if let Some(result) = checked.get(&id) {
                if let Some(p) = result {
                    report
                        .problems
                        .push(format!("{p} (also needed by snapshot {})", m.id));
                }
                continue;
            }
            let path = copy::chunk_path(&repo.chunks(), &id);
            let relp = format!("chunks/{}/{}", &id.to_hex()[..2], id.to_hex());
            let result = match copy::read_verified(&path, &id, size, &mut buf, "the repository") {
                Ok(()) => None,
                Err(e) if e.kind() == Kind::NotFound => {
                    Some(format!("{relp}: missing (needed by snapshot {})", m.id))
                }
                Err(e) if e.kind() == Kind::Integrity => Some(format!(
                    "{relp}: damaged: {} (needed by snapshot {})",
                    if buf.is_empty() {
                        "wrong size".to_string()
                    } else {
                        format!("SHA-256 is {}", Hash::of(&buf))
                    },
                    m.id
                )),
                Err(e) => Some(format!("{relp}: {e}")),
            };
            if let Some(p) = &result {
                report.problems.push(p.clone());
            }
            checked.insert(id, result);
            report.chunks_checked += 1;
            report.bytes_checked += size;
            done += size;
            progress(done, total);
        }
    }
    Ok(report)
}

/// Check a snapshot's own files (not its chunks) and its database before a
/// restore. Returns the problems found.
pub fn verify_files(repo: &Repo, m: &SnapshotMeta) -> Result<Vec<String>> {
    let dir = repo.snapshot_dir(&m.id);
    let mut problems = Vec::new();
    for f in &m.files {
        let rel = format!("snapshots/{}/{}", m.id, f.path);
        if f.path.contains('/') || f.path.starts_with('.') {
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
        for l in dbcopy::integrity_problems(&db)? {
            problems.push(format!(
                "snapshots/{}/{DB_FILE}: integrity_check: {l}",
                m.id
            ));
        }
        if problems.is_empty() {
            let f = dbcopy::facts(&db)?;
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

/// Open the snapshot's sealed node key with `passphrase`.
pub fn open_identity(
    repo: &Repo,
    m: &SnapshotMeta,
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> Result<Identity> {
    let info = m.identity.as_ref().ok_or_else(|| {
        Error::not_found(format!(
            "snapshot {} holds no node key (it was taken without --with-identity), so it cannot be restored with a key; \
             take a backup with --with-identity",
            m.id
        ))
    })?;
    let path = repo.snapshot_dir(&m.id).join(&info.file);
    let text = fs::read_to_string(&path).ctx(format!("reading {}", path.display()))?;
    if !text.contains("BITSYNC SEALED KEY") {
        return Err(Error::integrity(format!(
            "{} is not a sealed key",
            path.display()
        )));
    }
    // Ask first, so that "no passphrase available" is not reported as a wrong one.
    let pass = passphrase()?;
    let id = Identity::load(&path, &|| Ok(pass.clone())).map_err(|e| match e.kind() {
        Kind::Auth => Error::auth(format!(
            "wrong passphrase for the node key in snapshot {} (nothing was written)",
            m.id
        )),
        _ => e,
    })?;
    if id.id().to_hex() != m.node_id {
        return Err(Error::integrity(format!(
            "the key in snapshot {} is not node {}'s",
            m.id, m.node_id
        )));
    }
    Ok(id)
}

/// Copy one snapshot file to `dst` (new), checking it against its entry as it goes, and fsync it.
pub(crate) fn copy_file_verified(src: &Path, dst: &Path, expect: &FileEntry) -> Result<()> {
    use std::io::{Read, Write};
    let mut f = fs::File::open(src).ctx(format!("opening {}", src.display()))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .ctx(format!("creating {}", dst.display()))?;
    let mut h = Sha256::new();
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
    let got = Hash(h.finalize().into()).to_hex();
    if got != expect.sha256 || n != expect.size {
        return Err(Error::integrity(format!(
            "{} changed while it was copied (SHA-256 {got})",
            src.display()
        )));
    }
    drop(out);
    fsync_file(dst)
}

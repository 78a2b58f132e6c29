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
//!        snapshots/<id>/node.mlkem.sealed  with --with-identity, if the node has one: its ML-KEM-768 key, sealed
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
//!
//! Here: the layout, the types of `snapshot.json`, opening, locking and
//! listing a repository. Writing a snapshot (`bitsync backup`) is in
//! `snapshot.rs`, `--keep-last` in `prune.rs`, `backup verify` and the checks
//! before a restore in `verify.rs`, and the sealed node key and onion keys
//! (`--with-identity`) in `sealed.rs`. A repository in an object store
//! (`s3://bucket/prefix`) has the same layout as keys; `remote.rs` gives the
//! code here a local copy of what it reads and uploads what a backup made.

mod prune;
mod remote;
mod sealed;
mod snapshot;
mod verify;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{fsync_dir, write_atomic, FileLock};
use crate::chunks::Chunks;
use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, IoContext, Result};

pub(crate) use sealed::{open_identity, open_kem_key};
pub(crate) use snapshot::{backup, data_dir_node_id, BackupOptions, WithIdentity};
pub(crate) use verify::copy_file_verified;
pub(crate) use verify::{verify, verify_files};

pub(crate) const MARKER: &str = "bitsync-backup.json";
pub(crate) const REPO_FORMAT: &str = "bitsync-backup";
pub(crate) const REPO_VERSION: u32 = 1;
pub(crate) const SNAPSHOT_FORMAT: &str = "bitsync-backup-snapshot";
pub(crate) const SNAPSHOT_VERSION: u32 = 1;
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.json";
pub(crate) const DB_FILE: &str = "bitsync.db";
pub(crate) const CONFIG_FILE: &str = "config.toml";
pub(crate) const KEY_FILE: &str = "node.key.sealed";
pub(crate) const ONION_FILE: &str = "onion.keys.sealed";
pub(crate) const KEM_FILE: &str = "node.mlkem.sealed";

#[derive(Serialize, Deserialize, Debug)]
struct Marker {
    format: String,
    version: u32,
    created_at_ms: i64,
}

/// `snapshot.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct SnapshotMeta {
    pub(crate) format: String,
    pub(crate) format_version: u32,
    pub(crate) id: String,
    /// Hex node id of the instance backed up.
    pub(crate) node_id: String,
    pub(crate) created_at_ms: i64,
    /// RFC 3339, UTC, for people.
    pub(crate) created_at: String,
    pub(crate) bitsync_version: String,
    pub(crate) counts: Counts,
    /// Present when the snapshot holds the node key (sealed).
    pub(crate) identity: Option<IdentityInfo>,
    /// Every file of the snapshot directory except snapshot.json, with its SHA-256.
    pub(crate) files: Vec<FileEntry>,
    /// Every chunk the snapshot needs, as [id hex, bytes]; the id is the file's SHA-256.
    pub(crate) chunks: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub(crate) struct Counts {
    pub(crate) manifests: u64,
    pub(crate) chunks: u64,
    pub(crate) chunk_bytes: u64,
    pub(crate) head_seq: u64,
    pub(crate) trusted_peers: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct IdentityInfo {
    /// The file in the snapshot directory holding the sealed key.
    pub(crate) file: String,
    /// Whether the node's own key file was sealed (restore writes it back the same way).
    pub(crate) sealed_on_node: bool,
    pub(crate) kdf: String,
    /// The file holding the onion service's keys, sealed the same way (see
    /// [`super::onion`]); absent when the node never ran one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) onion_keys: Option<String>,
    /// The file holding the node's ML-KEM-768 key (`node.mlkem`), sealed
    /// the same way; absent when the node had none yet (it makes one when
    /// it next opens) or the snapshot is older.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kem_key: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct FileEntry {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

/// Readable snapshots (oldest first), and unreadable snapshot directories with why.
pub(crate) type SnapshotList = (Vec<SnapshotMeta>, Vec<(String, Error)>);

/// An opened backup repository.
pub(crate) struct Repo {
    /// The repository's directory; for one in an object store, the private
    /// local copy of its marker and of the snapshot files fetched so far.
    pub(crate) root: PathBuf,
    remote: Option<remote::Remote>,
}

/// Whether a `--repo` argument names an object store rather than a directory.
pub(crate) fn is_url(repo: &Path) -> bool {
    repo.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// A new repository's marker text.
fn new_marker() -> Vec<u8> {
    let m = Marker {
        format: REPO_FORMAT.into(),
        version: REPO_VERSION,
        created_at_ms: crate::manifest::now_ms(),
    };
    serde_json::to_vec_pretty(&m).expect("json")
}

impl Repo {
    /// How the repository is named to people: its directory or its URL.
    pub(crate) fn name(&self) -> String {
        match &self.remote {
            Some(r) => r.url().to_string(),
            None => self.root.display().to_string(),
        }
    }

    pub(crate) fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The repository's chunks, as one side of a copy.
    pub(crate) fn chunk_end(&self) -> (PathBuf, Option<&Chunks>) {
        (self.chunks(), self.remote.as_ref().map(|r| &r.chunks))
    }

    /// Read chunk `id` (of `size` bytes, 0: any) into `buf`, checked against
    /// its id; nothing in the repository changes either way.
    pub(crate) fn read_chunk(&self, id: &ChunkId, size: u64, buf: &mut Vec<u8>) -> Result<()> {
        let Some(r) = &self.remote else {
            let path = super::copy::chunk_path(&self.chunks(), id);
            return super::copy::read_verified(&path, id, size, buf, "the repository");
        };
        buf.clear();
        let data = r.chunks.fetch_untouched(id)?;
        if size != 0 && data.len() as u64 != size {
            return Err(Error::integrity(format!(
                "chunk {id} in {} is {} bytes, expected {size}: it is damaged",
                r.url(),
                data.len()
            )));
        }
        *buf = data;
        let actual = Hash::of(buf);
        if actual != *id {
            return Err(Error::integrity(format!(
                "chunk {id} in {} fails its hash (its SHA-256 is {actual}): it is damaged",
                r.url()
            )));
        }
        Ok(())
    }

    /// Make the files snapshot `m` lists readable under
    /// [`snapshot_dir`](Self::snapshot_dir) (a repository in an object store
    /// fetches them; a directory has them).
    pub(crate) fn fetch_files(&self, m: &SnapshotMeta) -> Result<()> {
        match &self.remote {
            Some(r) if is_plain_name(&m.id) => r.fetch_files(m, &self.snapshot_dir(&m.id)),
            _ => Ok(()),
        }
    }

    /// The object store, for a repository in one.
    fn remote(&self) -> Option<&remote::Remote> {
        self.remote.as_ref()
    }

    pub(crate) fn chunks(&self) -> PathBuf {
        self.root.join("chunks")
    }
    pub(crate) fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub(crate) fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots().join(id)
    }

    /// The path of a file `snapshot.json` names (`files[].path`,
    /// `identity.file`, `identity.onion_keys`), confined to the snapshot's
    /// directory: a repository is outside input, and restore must never read
    /// `/etc/shadow` because a snapshot says so. The name must be one plain
    /// file name (not absolute, no `/`, not `.`/`..` or hidden), and the file,
    /// if it exists, not a symbolic link. Reads then go through
    /// [`hash_file`] / [`open_snapshot_file`], which refuse links and FIFOs.
    pub(crate) fn snapshot_file(&self, m: &SnapshotMeta, name: &str) -> Result<PathBuf> {
        if !is_plain_name(&m.id) || !is_plain_name(name) {
            return Err(Error::integrity(format!(
                "snapshot {:?}: snapshot.json names the file {name:?}, which is not a file inside the snapshot; refused",
                m.id
            )));
        }
        Ok(self.snapshot_dir(&m.id).join(name))
    }

    /// A directory repository at `root`, unopened (the fuzz targets check
    /// path confinement without a repository on disk).
    #[cfg(fuzzing)]
    pub(crate) fn unopened(root: PathBuf) -> Repo {
        Repo { root, remote: None }
    }

    /// Open an existing repository: a directory, or `s3://bucket/prefix`.
    pub fn open(root: &Path) -> Result<Repo> {
        Repo::open_as(root, false)
    }

    fn open_as(root: &Path, create: bool) -> Result<Repo> {
        if !is_url(root) {
            check_marker(root, &root.display().to_string())?;
            return Ok(Repo {
                root: root.to_path_buf(),
                remote: None,
            });
        }
        let url = root.to_str().unwrap_or_default();
        let (remote, cache) = remote::Remote::open(url, create)?;
        check_marker(&cache, remote.url())?;
        Ok(Repo {
            root: cache,
            remote: Some(remote),
        })
    }

    /// Open a repository, creating it if `root` is missing or an empty directory.
    pub(crate) fn open_or_create(root: &Path) -> Result<Repo> {
        if is_url(root) {
            return Repo::open_as(root, true);
        }
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
        // The marker is written last: a repository without one was never finished.
        write_atomic(&root.join(MARKER), &new_marker(), 0o600)?;
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
                self.name()
            ),
        )
    }

    /// Take the writer's lock (backups, pruning).
    pub(crate) fn lock_exclusive(&self) -> Result<FileLock> {
        self.lock(true)
    }
    /// Take a reader's lock (verify, restore, clone --from-backup).
    pub(crate) fn lock_shared(&self) -> Result<FileLock> {
        self.lock(false)
    }

    /// Every finished snapshot, oldest first. Directories that cannot be read
    /// are returned as errors in the second list (`backup verify` reports them).
    pub(crate) fn list(&self) -> Result<SnapshotList> {
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
    pub(crate) fn find(&self, wanted: Option<&str>) -> Result<SnapshotMeta> {
        let (all, _) = self.list()?;
        let wanted = wanted
            .map(str::trim)
            .filter(|w| !w.is_empty() && *w != "latest");
        let Some(w) = wanted else {
            return all.into_iter().last().ok_or_else(|| {
                Error::not_found(format!(
                    "backup repository {} has no snapshots yet",
                    self.name()
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
                self.name(),
                self.name()
            ))),
            _ => Err(Error::invalid(format!(
                "snapshot {w:?} is ambiguous: {} snapshots start with it",
                matches.len()
            ))),
        }
    }
}

/// Check the marker of the repository whose directory (or local copy) is
/// `root`; `name` is how errors name the repository.
fn check_marker(root: &Path, name: &str) -> Result<()> {
    let marker = root.join(MARKER);
    let text = match fs::read(&marker) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(if root.is_dir() {
                format!(
                    "{} is not a bitsync backup repository (it has no {MARKER})",
                    name
                )
            } else {
                format!("no backup repository at {}", name)
            }))
        }
        Err(e) => return Err(Error::from_io(e, format!("reading {}", marker.display()))),
    };
    let m: Marker = serde_json::from_slice(&text).map_err(|e| {
        Error::integrity(format!(
            "{name}/{MARKER} is damaged ({e}); is {name} a backup repository?"
        ))
    })?;
    if m.format != REPO_FORMAT {
        return Err(Error::not_found(format!(
            "{} is not a bitsync backup repository",
            name
        )));
    }
    if m.version > REPO_VERSION {
        return Err(Error::invalid(format!(
            "{} has repository format version {}; this bitsync reads up to {REPO_VERSION}",
            name, m.version
        )));
    }
    Ok(())
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta> {
    let p = dir.join(SNAPSHOT_FILE);
    let text = fs::read(&p).ctx(format!("reading {}", p.display()))?;
    parse_meta(&text, &p)
}

/// Decode the `snapshot.json` read from `p` (named in errors) and refuse
/// another format or a newer version.
pub(crate) fn parse_meta(text: &[u8], p: &Path) -> Result<SnapshotMeta> {
    let m: SnapshotMeta = serde_json::from_slice(text)
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
pub(crate) fn chunk_list(m: &SnapshotMeta) -> Result<Vec<(ChunkId, u64)>> {
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

/// True when `name` is one plain, visible file name: what a snapshot's own
/// files are called (never absolute, never a path, never `..`).
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

/// Open a repository file for reading: a regular file only, never through a
/// symbolic link, never blocking on a FIFO ([`crate::durable::open_regular`]).
/// A file that is not a regular one is a damaged (or forged) snapshot.
pub(crate) fn open_snapshot_file(path: &Path) -> Result<fs::File> {
    crate::durable::open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => {
            Error::integrity(format!("{} {e}: the snapshot is damaged", path.display()))
        }
        _ => Error::from_io(e, format!("opening {}", path.display())),
    })
}

/// Read a (small) snapshot file whole, as [`open_snapshot_file`] opens it.
pub(crate) fn read_snapshot_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut text = Vec::new();
    open_snapshot_file(path)?
        .read_to_end(&mut text)
        .ctx(format!("reading {}", path.display()))?;
    Ok(text)
}

/// SHA-256 and length of a file, streamed.
pub(crate) fn hash_file(path: &Path) -> Result<(Hash, u64)> {
    use std::io::Read;
    let mut f = open_snapshot_file(path)?;
    let mut h = crate::crypto::Hasher::new();
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
    Ok((h.finish(), n))
}

pub(super) fn file_entry(dir: &Path, name: &str) -> Result<FileEntry> {
    let (h, size) = hash_file(&dir.join(name))?;
    Ok(FileEntry {
        path: name.to_string(),
        size,
        sha256: h.to_hex(),
    })
}

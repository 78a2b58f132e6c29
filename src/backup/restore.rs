//! `bitsync restore`: a snapshot back into a fresh data dir.
//!
//! The data dir is built beside its final path (`.<name>.restore-<pid>`) and
//! renamed into place only when it is complete, synced and opens as a node,
//! so a failed restore leaves nothing at the destination. Before anything is
//! written the snapshot's own files are re-hashed, its database passes
//! `PRAGMA integrity_check` and agrees with `snapshot.json`, and the sealed key
//! opens with the passphrase; each chunk is then re-hashed as it is copied,
//! and a chunk that fails aborts the restore before the data dir appears.
//!
//! Two modes:
//! - same identity (disaster recovery): the snapshot's key is written back as
//!   `node.key` (and its ML-KEM key as `node.mlkem`, if the snapshot holds
//!   one, so peers that pinned it keep accepting it), sealed again with the
//!   same passphrase if the node's key was sealed when the backup was taken,
//!   unsealed (mode 0600) otherwise;
//! - `--new-identity`: a new RSA-3072 key (and, on the first open, a new
//!   ML-KEM key); every item the old node could open
//!   gets an envelope for the new node id (unwrapped with the snapshot's key),
//!   the old node's envelopes are dropped, each changed item moves to a new
//!   seq, and `meta.node_id` is rewritten. Peers that trusted the old id must
//!   trust the new one; the outcome lists them.
//!
//! The chunks go where the restored config.toml says: the data dir's own
//! chunk dir, or the object store it names (`--chunks` overrides the
//! snapshot's choice). Objects already in that store with the right size
//! are kept (the usual disaster: the machine is gone, its bucket is not);
//! every read re-hashes them, as for any object.

use std::fs;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::copy::{self, CopyJob, End};
use super::repo::{self, Repo, CONFIG_FILE, DB_FILE};
use super::{fsync_dir, syncfs, TempTree};
use crate::chunks::Chunks;
use crate::crypto::{ChunkId, NodeId};
use crate::error::{Error, IoContext, Result};
use crate::identity::Identity;
use crate::node::{Node, Paths};
use crate::store::{Db, RekeyReport};

pub(crate) struct RestoreOptions<'a> {
    /// Snapshot id or prefix; `None`: the latest snapshot that holds the node key.
    pub(crate) snapshot: Option<&'a str>,
    pub(crate) new_identity: bool,
    /// Where the restored node keeps its chunks: "local" or `s3://bucket/prefix`
    /// (`None`: where the snapshot's config.toml says).
    pub(crate) chunks: Option<&'a str>,
}

#[derive(Debug)]
pub(crate) struct RestoreOutcome {
    pub(crate) snapshot: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) old_node_id: NodeId,
    pub(crate) node_id: NodeId,
    pub(crate) manifests: u64,
    pub(crate) chunks: u64,
    pub(crate) chunk_bytes: u64,
    pub(crate) rekey: Option<RekeyReport>,
    /// Trusted peers (id, name, address) that must now trust the new node id.
    pub(crate) peers_to_retrust: Vec<(String, String, String)>,
}

/// Restore a snapshot of the repository at `repo_root` into the new data dir `dest`.
pub(crate) fn restore(
    repo_root: &Path,
    dest: &Path,
    opts: &RestoreOptions<'_>,
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreOutcome> {
    if !super::is_missing_or_empty_dir(dest)? {
        return Err(Error::exists(format!(
            "{} exists and is not empty; restore only into a new or empty directory",
            dest.display()
        )));
    }
    let repo = Repo::open(repo_root)?;
    let _lock = repo.lock_shared()?;
    let meta = choose_snapshot(&repo, opts)?;
    repo.fetch_files(&meta)?;

    // 1. Verify what the snapshot is made of (its chunks are checked as they are copied).
    let t0 = std::time::Instant::now();
    let problems = repo::verify_files(&repo, &meta)?;
    if !problems.is_empty() {
        let problems = problems.join("; ");
        let id = &meta.id;
        return Err(Error::integrity(format!(
            "snapshot {id} is damaged, nothing was restored: {problems}"
        )));
    }
    // 2. The key, before anything is written: a wrong passphrase stops here.
    let pass = asked_once(passphrase);
    let old = repo::open_identity(&repo, &meta, &pass)?;
    let new = opts.new_identity.then(Identity::generate).transpose()?;
    let list = repo::chunk_list(&meta)?;

    // 3. Build the data dir beside its final place: its config first, which
    // says where the chunks go.
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (staging, mut guard) = make_staging(parent, dest)?;
    let paths = Paths::new(&staging);
    write_config(&repo, &meta, &paths, opts.chunks)?;
    let store = super::bucket_of(&staging, true).map_err(|e| match opts.chunks {
        None => e.context(
            "the snapshot's node kept its chunks in an object store (pass --chunks local, or --chunks s3://…, to restore them elsewhere)",
        ),
        Some(_) => e,
    })?;
    let local_chunks = if store.is_some() {
        0
    } else {
        meta.counts.chunk_bytes
    };
    super::check_space(
        dest,
        local_chunks + meta.files.iter().map(|f| f.size).sum::<u64>(),
    )?;
    let t1 = std::time::Instant::now();
    copy_snapshot(&repo, &meta, &list, &paths, store.as_ref(), dest, progress)?;
    let (identity_used, rekey) = write_keys(&repo, &meta, &paths, &pass, &old, new.as_ref())?;
    let t2 = std::time::Instant::now();
    tracing::debug!(
        verify_and_key_ms = (t1 - t0).as_millis() as u64,
        chunks_ms = (t2 - t1).as_millis() as u64,
        "restore phases"
    );
    check_opens(&staging, &pass, &identity_used)?;
    make_durable(&staging, &paths)?;

    // 4. Appear at once. (rename(2) replaces an empty directory.)
    fs::rename(&staging, dest).ctx(format!(
        "moving the restored data dir to {}",
        dest.display()
    ))?;
    guard.disarm();
    fsync_dir(parent)?;

    outcome(
        &meta,
        dest,
        old.id(),
        identity_used,
        rekey,
        opts.new_identity,
    )
}

/// `passphrase`, asked for at most once (a terminal prompt is not repeated).
fn asked_once(
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> impl Fn() -> Result<Zeroizing<String>> + '_ {
    let once = std::cell::OnceCell::new();
    move || {
        if let Some(p) = once.get() {
            return Ok(Zeroizing::clone(p));
        }
        let p = passphrase()?;
        let _ = once.set(p.clone());
        Ok(p)
    }
}

/// A private, empty directory beside `dest` (in `parent`), removed on drop.
fn make_staging(parent: &Path, dest: &Path) -> Result<(PathBuf, TempTree)> {
    fs::create_dir_all(parent).ctx(format!("creating {}", parent.display()))?;
    let staging = super::temp_sibling(dest, "restore");
    let _ = fs::remove_dir_all(&staging);
    let guard = TempTree::new(staging.clone());
    super::create_private_dir(&staging)?;
    Ok((staging, guard))
}

/// An empty chunks/tmp as a data dir has, then everything synced.
fn make_durable(staging: &Path, paths: &Paths) -> Result<()> {
    let _ = fs::remove_dir_all(paths.chunks().join("tmp"));
    fs::create_dir_all(paths.chunks().join("tmp")).ctx("creating chunks/tmp")?;
    let t3 = std::time::Instant::now();
    syncfs(staging)?;
    tracing::debug!(
        syncfs_ms = t3.elapsed().as_millis() as u64,
        "restore phases"
    );
    fsync_dir(staging)
}

/// What the restored data dir holds, read back from its database.
fn outcome(
    meta: &repo::SnapshotMeta,
    dest: &Path,
    old_node_id: NodeId,
    node_id: NodeId,
    rekey: Option<RekeyReport>,
    new_identity: bool,
) -> Result<RestoreOutcome> {
    let facts = Db::open_read_only(&Paths::new(dest).db())?.facts()?;
    Ok(RestoreOutcome {
        snapshot: meta.id.clone(),
        data_dir: dest.to_path_buf(),
        old_node_id,
        node_id,
        manifests: facts.manifests,
        chunks: facts.chunks.len() as u64,
        chunk_bytes: facts.chunk_bytes(),
        rekey,
        peers_to_retrust: if new_identity {
            facts.trusted_peers
        } else {
            Vec::new()
        },
    })
}

/// The node key of the data dir being built, sealed as the node's was
/// (with the backup passphrase, or plain 0600): the snapshot's own, with its
/// onion keys, or `new`, every item re-wrapped for it. Returns the node id.
fn write_keys(
    repo: &Repo,
    meta: &repo::SnapshotMeta,
    paths: &Paths,
    pass: &dyn Fn() -> Result<Zeroizing<String>>,
    old: &Identity,
    new: Option<&Identity>,
) -> Result<(NodeId, Option<RekeyReport>)> {
    let sealed_on_node = meta.identity.as_ref().is_some_and(|i| i.sealed_on_node);
    let key_pass = if sealed_on_node { Some(pass()?) } else { None };
    let key_pass = key_pass.as_deref().map(|s| s.as_str());
    match new {
        Some(n) => {
            let rekey = Db::open_copy(&paths.db())?.rekey(old, n)?;
            n.save(&paths.key(), key_pass)?;
            Ok((n.id(), Some(rekey)))
        }
        None => {
            old.save(&paths.key(), key_pass)?;
            if let Some(kem) = repo::open_kem_key(repo, meta, pass)? {
                kem.save(&paths.kem_key(), key_pass)?;
            }
            restore_onion_keys(repo, meta, paths, &pass()?)?;
            Ok((old.id(), None))
        }
    }
}

/// The snapshot asked for; by default the latest that holds the node key,
/// which restoring always needs.
fn choose_snapshot(repo: &Repo, opts: &RestoreOptions<'_>) -> Result<repo::SnapshotMeta> {
    if let Some(s) = opts.snapshot {
        return repo.find(Some(s));
    }
    let (all, _) = repo.list()?;
    let newest = all.last().map(|m| m.id.clone());
    let m = all
        .into_iter()
        .rev()
        .find(|m| m.identity.is_some())
        .ok_or_else(|| match &newest {
            None => Error::not_found(format!(
                "backup repository {} has no snapshots yet",
                repo.name()
            )),
            Some(_) => Error::not_found(format!(
            "no snapshot in {} holds the node key: restore needs one taken with --with-identity",
            repo.name()
        )),
        })?;
    if newest.as_deref() != Some(m.id.as_str()) {
        tracing::warn!(
            "restoring snapshot {}, the latest with the node key (newer snapshots were taken without --with-identity)",
            m.id
        );
    }
    Ok(m)
}

/// The snapshot's chunks and database into the data dir being built at
/// `paths` (the chunks into `store` if its config names one), each checked
/// against the snapshot as it is copied.
fn copy_snapshot(
    repo: &Repo,
    meta: &repo::SnapshotMeta,
    list: &[(ChunkId, u64)],
    paths: &Paths,
    store: Option<&Chunks>,
    dest: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let snap_dir = repo.snapshot_dir(&meta.id);
    let ((repo_chunks, repo_store), chunk_dir) = (repo.chunk_end(), paths.chunks());
    for d in [&chunk_dir, &paths.quarantine()] {
        fs::create_dir_all(d).ctx(format!("creating {}", d.display()))?;
    }
    let job = CopyJob {
        src: repo_store.map_or(End::Dir(&repo_chunks), End::Store),
        dst: store.map_or(End::Dir(&chunk_dir), End::Store),
        tmp_dir: &chunk_dir.join("tmp"),
        skip_existing: store.is_some(),
        src_label: "the backup repository",
        staged: true,
        outside_src: true,
    };
    copy::copy_chunks(&job, list, &|done| progress(done, meta.counts.chunk_bytes)).map_err(
        |e| {
            e.context(format!(
                "restore of snapshot {} stopped, nothing was written to {}",
                meta.id,
                dest.display()
            ))
        },
    )?;
    if let Some(s) = store {
        s.sync()?;
    }
    let entry = |name: &str| meta.files.iter().find(|f| f.path == name);
    let db_entry = entry(DB_FILE).ok_or_else(|| Error::integrity("snapshot lists no database"))?;
    repo::copy_file_verified(&snap_dir.join(DB_FILE), &paths.db(), db_entry)
}

/// The snapshot's config.toml (or the default) into the data dir being
/// built, with `[chunks] url` set from `chunks` ("local" removes it).
fn write_config(
    repo: &Repo,
    meta: &repo::SnapshotMeta,
    paths: &Paths,
    chunks: Option<&str>,
) -> Result<()> {
    let snap_dir = repo.snapshot_dir(&meta.id);
    match meta.files.iter().find(|f| f.path == CONFIG_FILE) {
        Some(c) => {
            let text = repo::read_snapshot_file(&snap_dir.join(CONFIG_FILE))?;
            if crate::crypto::Hash::of(&text).to_hex() != c.sha256 {
                return Err(Error::integrity(
                    "the snapshot's config.toml changed while it was read",
                ));
            }
            crate::durable::write_atomic(&paths.config(), &text, 0o600)?;
        }
        None => crate::durable::write_atomic(
            &paths.config(),
            crate::config::DEFAULT_CONFIG.as_bytes(),
            0o600,
        )?,
    }
    match chunks {
        None => Ok(()),
        Some("local") => crate::config::set_chunks_url(&paths.config(), None),
        Some(url) => {
            crate::chunks::BucketSpec::parse_url(url)?;
            crate::config::set_chunks_url(&paths.config(), Some(url))
        }
    }
}

/// The restored data dir must open as a node (key matches the db, config
/// parses) and its database be sound.
fn check_opens(
    staging: &Path,
    pass: &dyn Fn() -> Result<Zeroizing<String>>,
    identity_used: &NodeId,
) -> Result<()> {
    let node =
        Node::open(staging, pass).map_err(|e| e.context("the restored data dir does not open"))?;
    if node.id() != *identity_used {
        return Err(Error::integrity("the restored node has an unexpected id"));
    }
    let problems = node.db.integrity_check()?;
    if !problems.is_empty() {
        return Err(Error::integrity(format!(
            "the restored database fails integrity_check: {}",
            problems.join("; ")
        )));
    }
    Ok(())
}

/// Same identity: put the onion service's keys back, so the node keeps its
/// `.onion` address. The sealed file is checked against its listed SHA-256.
fn restore_onion_keys(
    repo: &Repo,
    meta: &repo::SnapshotMeta,
    paths: &Paths,
    pass: &str,
) -> Result<()> {
    let Some(file) = meta.identity.as_ref().and_then(|i| i.onion_keys.as_deref()) else {
        return Ok(());
    };
    let entry = meta
        .files
        .iter()
        .find(|f| f.path == file)
        .ok_or_else(|| Error::integrity("snapshot.json does not list the sealed onion keys"))?;
    let sealed = repo::read_snapshot_file(&repo.snapshot_file(meta, file)?)?;
    if crate::crypto::Hash::of(&sealed).to_hex() != entry.sha256 {
        return Err(Error::integrity(format!(
            "the snapshot's {file} fails its SHA-256"
        )));
    }
    let plain = crate::crypto::unseal(pass, &sealed)?;
    super::onion::unbundle(&plain, &paths.tor())?;
    Ok(())
}

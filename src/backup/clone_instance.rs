//! `bitsync clone-instance`: a consistent, verified copy of an instance's
//! database and chunk directory ("attachments") at other paths, with the
//! interface of CISO Assistant's `clone_instance` command.
//!
//! - The database is copied with SQLite's online backup API, so a live node's
//!   WAL content is included, then checked with `PRAGMA integrity_check`.
//! - The chunks copied are those the copy's database lists as present, each
//!   re-hashed; a damaged source chunk stops the copy (the source is never
//!   changed: nothing is quarantined).
//! - Everything is built under temporary names and renamed into place. When
//!   the database and the attachments share a parent directory that does not
//!   exist yet, that whole directory appears with one rename; otherwise the
//!   attachments are renamed first and the database last, so the database
//!   (what makes a data dir) never refers to chunks that are not there.
//! - An existing destination is replaced only with `--force`, or after a yes
//!   on the terminal; with no terminal the command refuses.
//! - `--new-identity`: the copy gets its own RSA-3072 key, written as
//!   `node.key` next to `--dest-db` with a new ML-KEM key as `node.mlkem`
//!   (both sealed with the same passphrase if the source key is sealed, else
//!   plain with mode 0600); every item the source
//!   could open is re-wrapped for it (see [`Db::rekey`]). The source's
//!   `config.toml` is copied next to `--dest-db` too when none is there, so
//!   `<dest-db dir>` is a runnable data dir when `--dest-attachments` is
//!   `<dest-db dir>/chunks`. Without `--new-identity` no key is written: the
//!   copy keeps the source's node id and must never run beside it.
//! - A source whose chunks are in an object store (its config.toml says so)
//!   is copied from there; the copy's chunks are always the local
//!   `--dest-attachments`, and the config.toml copied beside it names no
//!   object store, so the copy never writes into the source's bucket.

use std::fs;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::copy::{self, CopyJob, CopyStats, End};
use super::dbcopy;
use super::{fsync_dir, human_bytes, syncfs, temp_sibling, TempTree};
use crate::chunks::Chunks;
use crate::crypto::NodeId;
use crate::error::{Error, IoContext, Result};
use crate::identity::{self, Identity};
use crate::store::{self, Db, DbFacts, RekeyReport};

/// The source's node key file and how to get its passphrase if it is sealed.
pub(crate) type SourceKey<'a> = (&'a Path, &'a dyn Fn() -> Result<Zeroizing<String>>);

pub(crate) struct CloneOptions {
    pub(crate) source_db: PathBuf,
    pub(crate) source_attachments: PathBuf,
    pub(crate) dest_db: PathBuf,
    pub(crate) dest_attachments: PathBuf,
    pub(crate) force: bool,
    pub(crate) new_identity: bool,
}

/// Sizes shown before copying.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) db_bytes: u64,
    pub(crate) wal_bytes: u64,
    pub(crate) chunks: u64,
    pub(crate) chunk_bytes: u64,
    pub(crate) node_id: NodeId,
    /// What already exists at the destination and would be replaced.
    pub(crate) existing: Vec<PathBuf>,
    pub(crate) free: Option<u64>,
    /// The object store the source's chunks are in, when its config names one
    /// (then `source_attachments` is not read).
    pub(crate) source_store: Option<Chunks>,
}

#[derive(Debug)]
pub(crate) struct CloneOutcome {
    pub(crate) db_bytes: u64,
    pub(crate) chunks: CopyStats,
    pub(crate) source_node_id: NodeId,
    pub(crate) node_id: NodeId,
    pub(crate) rekey: Option<RekeyReport>,
    pub(crate) key_path: Option<PathBuf>,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) elapsed: std::time::Duration,
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Check the paths and measure what would be copied (reads only).
pub(crate) fn plan(o: &CloneOptions) -> Result<Plan> {
    if !o.source_db.is_file() {
        return Err(Error::not_found(format!(
            "source database {} does not exist",
            o.source_db.display()
        )));
    }
    let source_store = super::bucket_of(&parent_of(&o.source_db), false)?;
    if source_store.is_none() && !o.source_attachments.is_dir() {
        return Err(Error::not_found(format!(
            "source attachments {} is not a directory",
            o.source_attachments.display()
        )));
    }
    let (sd, sa, dd, da) = (
        absolute(&o.source_db),
        absolute(&o.source_attachments),
        absolute(&o.dest_db),
        absolute(&o.dest_attachments),
    );
    if dd == sd || da == sa {
        return Err(Error::invalid(
            "the destination is the source; choose other --dest-db and --dest-attachments",
        ));
    }
    if da.starts_with(&sa) || sa.starts_with(&da) || dd.starts_with(&sa) || dd.starts_with(&da) {
        return Err(Error::invalid(
            "--dest-attachments, --source-attachments and --dest-db must not be inside one another",
        ));
    }
    if dd.is_dir() {
        return Err(Error::invalid(format!(
            "--dest-db {} is a directory; give the database file's path",
            dd.display()
        )));
    }
    let facts = Db::open_read_only(&o.source_db)?.facts()?;
    let db_bytes = fs::metadata(&o.source_db).map(|m| m.len()).unwrap_or(0);
    let wal_bytes = fs::metadata(wal_path(&o.source_db))
        .map(|m| m.len())
        .unwrap_or(0);
    let mut existing = Vec::new();
    if o.dest_db.exists() {
        existing.push(o.dest_db.clone());
    }
    if !super::is_missing_or_empty_dir(&o.dest_attachments)? {
        existing.push(o.dest_attachments.clone());
    }
    if o.new_identity && key_path(o).exists() {
        existing.push(key_path(o));
    }
    Ok(Plan {
        db_bytes,
        wal_bytes,
        chunks: facts.chunks.len() as u64,
        chunk_bytes: facts.chunk_bytes(),
        node_id: facts.node_id,
        existing,
        free: super::free_space(&o.dest_attachments),
        source_store,
    })
}

fn wal_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", db.display()))
}
fn shm_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", db.display()))
}

/// Where `--new-identity` writes the copy's key: `node.key` next to `--dest-db`.
pub(crate) fn key_path(o: &CloneOptions) -> PathBuf {
    parent_of(&o.dest_db).join("node.key")
}

/// Make the copy. The caller has shown the plan and obtained consent when
/// `plan.existing` is not empty. `source_key` is the source's node key file
/// (needed with `--new-identity` to unwrap item keys).
pub(crate) fn run(
    o: &CloneOptions,
    plan: &Plan,
    source_key: Option<SourceKey<'_>>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CloneOutcome> {
    let started = std::time::Instant::now();
    if !plan.existing.is_empty() && !o.force {
        return Err(Error::exists(format!(
            "{} exists; pass --force to replace it",
            plan.existing[0].display()
        )));
    }
    // Open the source key first: a wrong passphrase stops before anything is written.
    let (old_identity, sealed) = if o.new_identity {
        let (id, sealed) = open_source_key(o, plan, source_key)?;
        (Some(id), sealed)
    } else {
        (None, None)
    };
    super::check_space(
        &o.dest_attachments,
        plan.chunk_bytes + plan.db_bytes + plan.wal_bytes,
    )?;
    let stage = Stage::new(o)?;

    // 1. The database, consistent, checked.
    dbcopy::snapshot_db(&o.source_db, &stage.db)?;
    let problems = store::integrity_problems(&stage.db)?;
    if !problems.is_empty() {
        return Err(Error::integrity(format!(
            "the copy of {} fails PRAGMA integrity_check: {}",
            o.source_db.display(),
            problems.join("; ")
        )));
    }
    let facts = Db::open_read_only(&stage.db)?.facts()?;

    // 2. Every chunk it lists, re-hashed.
    let src = match &plan.source_store {
        Some(store) => End::Store(store),
        None => End::Dir(&o.source_attachments),
    };
    let stats = copy_attachments(src, &stage.att, &facts, progress)?;

    // 3. A new identity for a copy that runs beside the original.
    let mut rekey = None;
    let mut node_id = facts.node_id;
    let new_identity = if let Some(old) = &old_identity {
        let new = Identity::generate()?;
        rekey = Some(Db::open_copy(&stage.db)?.rekey(old, &new)?);
        node_id = new.id();
        Some(new)
    } else {
        None
    };
    super::fsync_file(&stage.db)?;
    syncfs(&stage.att)?;

    // 4. Into place.
    let extras = Extras {
        new_identity: new_identity.as_ref(),
        sealed: sealed.as_deref().map(|s| s.as_str()),
        written_key: None,
        written_config: None,
    };
    let extras = stage.put_in_place(o, extras)?;
    let db_bytes = fs::metadata(&o.dest_db).map(|m| m.len()).unwrap_or(0);
    Ok(CloneOutcome {
        db_bytes,
        chunks: stats,
        source_node_id: facts.node_id,
        node_id,
        rekey,
        key_path: extras.written_key,
        config_path: extras.written_config,
        elapsed: started.elapsed(),
    })
}

/// The source's node key, checked against the source database, and its
/// passphrase when it is sealed (the copy's new key is sealed with it too).
fn open_source_key(
    o: &CloneOptions,
    plan: &Plan,
    source_key: Option<SourceKey<'_>>,
) -> Result<(Identity, Option<Zeroizing<String>>)> {
    let (path, pass) =
        source_key.ok_or_else(|| Error::invalid("--new-identity needs the source node key"))?;
    if !path.is_file() {
        return Err(Error::not_found(format!(
            "--new-identity needs the source's node key to re-wrap item keys, and {} does not exist",
            path.display()
        )));
    }
    let text = Zeroizing::new(fs::read_to_string(path).ctx(format!("reading {}", path.display()))?);
    let is_sealed = identity::is_sealed_pem(&text);
    let once = std::cell::OnceCell::new();
    let cached = || -> Result<Zeroizing<String>> {
        if let Some(p) = once.get() {
            return Ok(Zeroizing::clone(p));
        }
        let p = pass()?;
        let _ = once.set(p.clone());
        Ok(p)
    };
    let id = Identity::load(path, &cached)?;
    if id.id() != plan.node_id {
        return Err(Error::integrity(format!(
            "node key {} ({}) does not belong to {} ({})",
            path.display(),
            id.id(),
            o.source_db.display(),
            plan.node_id
        )));
    }
    let sealed = if is_sealed { Some(cached()?) } else { None };
    Ok((id, sealed))
}

/// Copy the chunks the staged database lists into `stage_att`, re-hashed.
fn copy_attachments(
    src: End<'_>,
    stage_att: &Path,
    facts: &DbFacts,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CopyStats> {
    fs::create_dir_all(stage_att).ctx(format!("creating {}", stage_att.display()))?;
    let tmp = stage_att.join("tmp");
    let job = CopyJob {
        src,
        dst: End::Dir(stage_att),
        tmp_dir: &tmp,
        skip_existing: false,
        src_label: "the source attachments",
        staged: true,
        outside_src: false,
    };
    let total = facts.chunk_bytes();
    let stats = copy::copy_chunks(&job, &facts.chunks, &|d| progress(d, total))
        .map_err(|e| e.context("clone stopped, nothing was written to the destination"))?;
    // Leave an empty tmp/ as a data dir's chunk dir has.
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).ctx(format!("creating {}", tmp.display()))?;
    Ok(stats)
}

/// What `--new-identity` adds next to the database, and what was written.
struct Extras<'a> {
    new_identity: Option<&'a Identity>,
    sealed: Option<&'a str>,
    written_key: Option<PathBuf>,
    written_config: Option<PathBuf>,
}

impl Extras<'_> {
    /// Write the new key (and the source's config.toml, if none is there) into `dir`.
    fn write(&mut self, o: &CloneOptions, dir: &Path) -> Result<()> {
        let Some(n) = self.new_identity else {
            return Ok(());
        };
        let source_config = parent_of(&o.source_db).join("config.toml");
        n.save(&dir.join("node.key"), self.sealed)?;
        // A new identity gets a new ML-KEM key too, sealed like its node key.
        crate::identity::KemKey::generate()?.save(&dir.join("node.mlkem"), self.sealed)?;
        self.written_key = Some(key_path(o));
        let cfg = dir.join("config.toml");
        if !cfg.exists() && source_config.is_file() {
            let text =
                fs::read(&source_config).ctx(format!("reading {}", source_config.display()))?;
            crate::durable::write_atomic(&cfg, &text, 0o600)?;
            // The copy's chunks are the local attachments, never the source's bucket.
            crate::config::set_chunks_url(&cfg, None)?;
            self.written_config = Some(parent_of(&o.dest_db).join("config.toml"));
        }
        if absolute(&o.dest_attachments) == absolute(&parent_of(&o.dest_db).join("chunks")) {
            fs::create_dir_all(dir.join("quarantine")).ctx("creating quarantine/")?;
        }
        Ok(())
    }
}

/// Where the copy is built: one fresh directory for everything when the
/// database and the attachments share a parent that does not exist yet,
/// else temporary siblings of each.
struct Stage {
    db: PathBuf,
    att: PathBuf,
    /// The whole new directory, when there is one.
    root: Option<PathBuf>,
    guards: Vec<TempTree>,
}

impl Stage {
    fn new(o: &CloneOptions) -> Result<Stage> {
        let db_parent = parent_of(&o.dest_db);
        let att_parent = parent_of(&o.dest_attachments);
        let whole_dir = absolute(&db_parent) == absolute(&att_parent) && !db_parent.exists();
        if whole_dir {
            let root = temp_sibling(&db_parent, "clone");
            let _ = fs::remove_dir_all(&root);
            let grand = parent_of(&db_parent);
            fs::create_dir_all(&grand).ctx(format!("creating {}", grand.display()))?;
            let guards = vec![TempTree::new(root.clone())];
            super::create_private_dir(&root)?;
            let name = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
            return Ok(Stage {
                db: root.join(name(&o.dest_db)),
                att: root.join(name(&o.dest_attachments)),
                root: Some(root),
                guards,
            });
        }
        for p in [&db_parent, &att_parent] {
            fs::create_dir_all(p).ctx(format!("creating {}", p.display()))?;
        }
        let sa = temp_sibling(&o.dest_attachments, "clone");
        let sd = temp_sibling(&o.dest_db, "clone");
        let _ = fs::remove_dir_all(&sa);
        let _ = fs::remove_file(&sd);
        Ok(Stage {
            guards: vec![TempTree::new(sa.clone()), TempTree::new(sd.clone())],
            db: sd,
            att: sa,
            root: None,
        })
    }

    /// Rename the finished copy into place (see the module comment for the order).
    fn put_in_place<'a>(mut self, o: &CloneOptions, mut extras: Extras<'a>) -> Result<Extras<'a>> {
        let db_parent = parent_of(&o.dest_db);
        if let Some(root) = self.root.take() {
            extras.write(o, &root)?;
            fsync_dir(&root)?;
            fs::rename(&root, &db_parent)
                .ctx(format!("moving the copy into {}", db_parent.display()))?;
            self.guards.clear_disarmed();
            fsync_dir(&parent_of(&db_parent))?;
            return Ok(extras);
        }
        // Attachments first; the database, which makes the copy a data dir, last.
        self.replace_attachments(o)?;
        extras.write(o, &db_parent)?;
        // A stale -wal beside the old database would be replayed into the new one.
        for side in [wal_path(&o.dest_db), shm_path(&o.dest_db)] {
            match fs::remove_file(&side) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::from_io(e, format!("removing {}", side.display()))),
            }
        }
        fs::rename(&self.db, &o.dest_db).ctx(format!(
            "moving the database copy to {}",
            o.dest_db.display()
        ))?;
        self.guards.clear_disarmed();
        fsync_dir(&db_parent)?;
        Ok(extras)
    }

    /// The staged attachments in place of `--dest-attachments` (the old ones
    /// are put back if the rename fails).
    fn replace_attachments(&self, o: &CloneOptions) -> Result<()> {
        let old_att = temp_sibling(&o.dest_attachments, "replaced");
        let had_att = o.dest_attachments.exists();
        if had_att {
            let _ = fs::remove_dir_all(&old_att);
            fs::rename(&o.dest_attachments, &old_att).ctx(format!(
                "moving the old {} aside",
                o.dest_attachments.display()
            ))?;
        }
        if let Err(e) = fs::rename(&self.att, &o.dest_attachments) {
            if had_att {
                let _ = fs::rename(&old_att, &o.dest_attachments);
            }
            return Err(Error::from_io(
                e,
                format!("moving the copy into {}", o.dest_attachments.display()),
            ));
        }
        if had_att {
            let _ = fs::remove_dir_all(&old_att);
        }
        fsync_dir(&parent_of(&o.dest_attachments))
    }
}

trait DisarmAll {
    fn clear_disarmed(&mut self);
}
impl DisarmAll for Vec<TempTree> {
    fn clear_disarmed(&mut self) {
        for g in self.iter_mut() {
            g.disarm();
        }
        self.clear();
    }
}

/// The plan as people read it, before copying.
pub(crate) fn describe(o: &CloneOptions, p: &Plan) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "source: node {}\n  database    {} ({}{})\n  attachments {} ({} chunks, {})\n",
        p.node_id,
        o.source_db.display(),
        human_bytes(p.db_bytes),
        if p.wal_bytes > 0 {
            format!(
                " + {} not yet checkpointed in -wal",
                human_bytes(p.wal_bytes)
            )
        } else {
            String::new()
        },
        match &p.source_store {
            Some(store) => store.describe(),
            None => o.source_attachments.display().to_string(),
        },
        p.chunks,
        human_bytes(p.chunk_bytes)
    ));
    s.push_str(&format!(
        "destination:\n  database    {}\n  attachments {}{}\n",
        o.dest_db.display(),
        o.dest_attachments.display(),
        match p.free {
            Some(f) => format!("\n  free space  {}", human_bytes(f)),
            None => String::new(),
        }
    ));
    if o.new_identity {
        s.push_str(&format!(
            "  new node key {} (the copy gets its own identity)\n",
            key_path(o).display()
        ));
    }
    for e in &p.existing {
        s.push_str(&format!("  {} exists and will be replaced\n", e.display()));
    }
    s
}

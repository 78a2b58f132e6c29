//! `--keep-last`: old snapshots vanish first (one rename each), then only
//! chunks no remaining snapshot lists are removed.

use std::collections::HashSet;
use std::fs;

use super::super::fsync_dir;
use super::{Repo, SnapshotMeta};
use crate::error::{IoContext, Result};

#[derive(Debug, Clone, Default)]
pub(crate) struct PruneOutcome {
    pub(crate) removed_snapshots: Vec<String>,
    pub(crate) removed_chunks: u64,
    pub(crate) removed_bytes: u64,
    /// Chunk removal was skipped because a remaining snapshot could not be read.
    pub(crate) chunk_gc_skipped: Option<String>,
}

/// Keep the newest `keep` snapshots (always including `just_made`), then
/// remove every chunk none of them lists. Caller holds the exclusive lock.
pub(super) fn prune(repo: &Repo, keep: usize, just_made: &str) -> Result<PruneOutcome> {
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

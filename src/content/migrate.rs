//! `bitsync chunks migrate`: move a node's chunks to another store (a local
//! dir to an S3 bucket, or back), every chunk re-hashed on the way.
//!
//! The node's configuration names the store, so the switch is one atomic
//! rewrite of `config.toml`, made only after every recorded chunk is in the
//! new store and durable there. Until then the node runs on the old store
//! untouched; a run killed at any point leaves the old store in charge and
//! the next run copies only what the new one still lacks. The old store is
//! left as it was for the operator to remove.

use crate::chunks::{Chunks, Location};
use crate::crypto::Hash;
use crate::error::{Error, Result};
use crate::node::Node;

/// Chunks written to the new store between syncs.
const SYNC_EVERY: usize = 64;

#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Chunks copied by this run.
    pub copied: u64,
    pub copied_bytes: u64,
    /// Chunks the new store already held whole (an earlier, interrupted run).
    pub already: u64,
    /// The new store, as `status` names it.
    pub to: String,
}

/// Copy every chunk the node records into the store at `to` and then make
/// it the node's store. `url` is what `[chunks] url` becomes (`None`: the
/// data dir's own chunk dir). A chunk that fails its hash in the old store
/// stops the run (DATA_LOSS) with nothing switched: `verify` and a sync
/// from a peer repair it first.
pub fn migrate(
    node: &Node,
    to: &Location,
    url: Option<&str>,
    progress: &dyn Fn(u64, u64),
) -> Result<MigrateReport> {
    let target = Chunks::open(to, true)?;
    if target.describe() == node.chunks.describe() {
        return Err(Error::invalid(format!(
            "the node's chunks are already in the {}",
            target.describe()
        )));
    }
    let chunks = node.db.chunk_list()?;
    let total: u64 = chunks.iter().map(|(_, s)| *s).sum();
    let mut report = MigrateReport {
        to: target.describe(),
        ..Default::default()
    };
    let (mut done, mut unsynced) = (0u64, 0usize);
    for (id, size) in &chunks {
        // Whole in the new store already (a PUT or a rename is all or
        // nothing, and what a killed run left is checked here, not trusted).
        let there = match target.stamp(id)? {
            Some(s) if s.size == *size => target
                .read_unchecked(id)
                .is_ok_and(|(d, _)| Hash::of(&d) == *id),
            _ => false,
        };
        if there {
            report.already += 1;
        } else {
            let data = node.read_chunk(id)?;
            target.write(id, &data)?;
            report.copied += 1;
            report.copied_bytes += data.len() as u64;
            unsynced += 1;
            if unsynced >= SYNC_EVERY {
                target.sync()?;
                unsynced = 0;
            }
        }
        done += size;
        progress(done, total);
    }
    target.sync()?;
    crate::config::set_chunks_url(&node.paths.config(), url)?;
    tracing::info!(from = %node.chunks.describe(), to = %report.to, chunks = chunks.len(), "chunk store migrated");
    Ok(report)
}

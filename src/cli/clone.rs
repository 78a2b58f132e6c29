//! `clone`: make this node a complete copy of a peer's instance, optionally
//! taking chunks from a local backup repository first.

use std::path::Path;
use std::sync::Arc;

use super::{progress_bar, runtime, Cli};
use crate::backup::hybrid::RepoChunks;
use crate::error::{Error, Result};
use crate::node::{self, InitOutcome, Node};
use crate::replicator::ChunkSource;
use crate::transport::Dialer;

pub(super) fn clone(cli: &Cli, token_or_peer: &str, from_backup: Option<&Path>) -> Result<()> {
    let local = from_backup.map(RepoChunks::open).transpose()?.map(Arc::new);
    let dir = cli.data_dir();
    if !dir.join("bitsync.db").exists() {
        if let InitOutcome::Created(id) = node::init(&dir, None)? {
            eprintln!("initialized {} as node {id}", dir.display());
        }
    }
    let n = cli.open_node()?;
    runtime()?.block_on(clone_command(n, token_or_peer, local))
}

async fn clone_command(n: Node, target: &str, local: Option<Arc<RepoChunks>>) -> Result<()> {
    let n = Arc::new(n);
    let (dialer, _) = Dialer::for_node(&n)?;
    let rep = crate::replicator::Replicator::new(n.clone(), dialer);
    if let Some(l) = &local {
        rep.set_local_chunks(l.clone());
    }
    let pb = progress_bar(0, "clone");
    let out = crate::replicator::clone_now(&rep, target, |p| {
        pb.set_length(p.bytes_total);
        pb.set_position(p.bytes_done);
    })
    .await;
    pb.finish_and_clear();
    if let Some(l) = &local {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "{} chunks ({} bytes) taken from {}, each hash-checked",
            l.hits.load(Relaxed),
            l.hit_bytes.load(Relaxed),
            l.describe()
        );
    }
    let (out, failure) = match out {
        Ok(o) => (o, None),
        Err((e, o)) => (o, Some(e)),
    };
    for e in out.errors.iter().filter(|e| {
        failure
            .as_ref()
            .map(|f| f.message() != e.as_str())
            .unwrap_or(true)
    }) {
        eprintln!("  problem: {e}");
    }
    if let Some(e) = failure {
        if out.bytes > 0 || out.items > 0 {
            eprintln!(
                "received {} items, {} bytes before stopping; they are kept",
                out.items, out.bytes
            );
        }
        return Err(e);
    }
    // Exit 0 only if every item here is complete and verified.
    let ids = n.db.content_ids()?;
    let incomplete = ids
        .iter()
        .filter(|id| !n.db.is_complete(id).unwrap_or(false))
        .count();
    let secs = out.elapsed.as_secs_f64().max(0.001);
    println!(
        "cloned {} items ({} new), {} bytes received in {:.1} s ({:.1} MB/s)",
        ids.len(),
        out.items,
        out.bytes,
        secs,
        out.bytes as f64 / secs / 1e6
    );
    if incomplete > 0 {
        return Err(Error::unavailable(format!(
            "{incomplete} item(s) are incomplete; run the clone again to resume"
        )));
    }
    Ok(())
}

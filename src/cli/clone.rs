//! `clone`: make this node a complete copy of a peer's instance, optionally
//! taking chunks from a local backup repository first.

use std::path::Path;
use std::sync::Arc;

use super::{progress_bar, runtime, Cli};
use crate::backup::hybrid::RepoChunks;
use zeroize::Zeroizing;

use super::output::outln;
use crate::error::{Error, IoContext, Result};
use crate::node::{self, InitOutcome, Node};
use crate::replicator::ChunkSource;
use crate::transport::Dialer;

/// The longest line read as a token: a token with many addresses is a few
/// KiB; anything longer is not one.
const MAX_TOKEN_LINE: u64 = 64 * 1024;

/// What to clone from: the argument, or the token read from stdin (`-`) or
/// from `--token-file`. A token on the command line is visible to every
/// local user in `ps` until it is redeemed; stdin and a file are not.
pub(super) fn target(arg: Option<&str>, file: Option<&Path>) -> Result<Zeroizing<String>> {
    use std::io::{BufRead, Read};
    let (line, from) = match (arg, file) {
        (Some("-"), _) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .take(MAX_TOKEN_LINE)
                .read_line(&mut line)
                .ctx("reading the invite token from stdin")?;
            (Zeroizing::new(line), "stdin".to_string())
        }
        (Some(a), _) => return Ok(Zeroizing::new(a.to_string())),
        (None, Some(f)) => {
            let mut text = Zeroizing::new(String::new());
            std::fs::File::open(f)
                .and_then(|h| h.take(MAX_TOKEN_LINE).read_to_string(&mut text))
                .ctx(format!("token file {}", f.display()))?;
            let line = Zeroizing::new(text.lines().next().unwrap_or("").to_string());
            (line, format!("token file {}", f.display()))
        }
        (None, None) => {
            return Err(Error::invalid(
                "give an invite token, a peer id, - or --token-file",
            ))
        }
    };
    let t = line.trim();
    if t.is_empty() {
        return Err(Error::invalid(format!(
            "{from} holds no invite token (an empty first line)"
        )));
    }
    Ok(Zeroizing::new(t.to_string()))
}

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
    outln!(
        "cloned {} items ({} new), {} bytes received in {:.1} s ({:.1} MB/s)",
        ids.len(),
        out.items,
        out.bytes,
        secs,
        out.bytes as f64 / secs / 1e6
    );
    // Items held without a key: by design (a source that serves us blind)
    // or awaiting one (they came from a blind mirror; PROTOCOL.md §2.3).
    let (mut blind, mut awaiting) = (0, 0);
    for (publisher, k) in n.db.keyless_by_publisher(&n.id())? {
        if crate::content::mirrors_blind(&n, &publisher) {
            blind += k;
        } else {
            awaiting += k;
        }
    }
    if blind > 0 {
        outln!("{blind} items mirrored blind (no key here, by design)");
    }
    if awaiting > 0 {
        outln!("{awaiting} items await a key: a sync with a keyed peer of their publisher completes them");
    }
    if incomplete > 0 {
        return Err(Error::unavailable(format!(
            "{incomplete} item(s) are incomplete; run the clone again to resume"
        )));
    }
    Ok(())
}

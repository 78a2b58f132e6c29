//! The background scrub: every chunk re-hashed regularly, so a chunk sent
//! without a re-hash (on the strength of a recorded check) was checked not
//! long ago, and a chunk that rots on disk is quarantined before a peer asks.
//!
//! A pass walks the present chunks and re-hashes each whose check on record is
//! missing, of another version of the file, or older than [`SCRUB_AFTER_MS`],
//! reading at most `scrub_mib_per_sec` MiB/s (config; 0 turns the scrub off).
//! A chunk that fails is quarantined and forgotten, as `verify` does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::node::Node;

/// A check younger than this is not renewed by the scrub (a day): with
/// [`CHECK_TRUSTED_MS`](crate::node::CHECK_TRUSTED_MS) at 7 days, a chunk's
/// check stays trusted for sends while the scrub runs at any rate that gets
/// round the store within 6 days.
pub const SCRUB_AFTER_MS: i64 = 24 * 3600 * 1000;

/// Checks recorded per database transaction.
const RECORD_BATCH: usize = 64;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks re-hashed (the others had a recent check of the same file).
    pub checked: u64,
    /// Chunks that failed and were quarantined.
    pub failed: u64,
}

/// One pass over the present chunks at `bytes_per_sec` (> 0). Stops early,
/// with what it did so far, once `stop` is set.
pub fn scrub_pass(node: &Node, bytes_per_sec: u64, stop: &AtomicBool) -> Result<ScrubReport> {
    let mut report = ScrubReport::default();
    let mut good = Vec::new();
    let start = Instant::now();
    let mut read = 0u64;
    for (id, _) in node.db.chunk_list()? {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = crate::manifest::now_ms() - SCRUB_AFTER_MS;
        let stamp = node.chunks.stamp(&id).ok().flatten();
        if matches!(node.db.chunk_check(&id)?, Some((s, at)) if Some(s) == stamp && at >= due) {
            continue;
        }
        let checked = node.chunks.read_unchecked(&id).and_then(|(data, stamp)| {
            read += data.len() as u64;
            node.chunks.check(&id, &data)?;
            Ok(stamp)
        });
        report.checked += 1;
        match checked {
            Ok(stamp) => good.push((id, stamp)),
            Err(e) => {
                report.failed += 1;
                let e = node.chunk_failed(&id, e);
                tracing::warn!(chunk = %id, "scrub: {e}");
            }
        }
        if good.len() >= RECORD_BATCH {
            node.db.record_checks(&std::mem::take(&mut good));
        }
        // Hold the pace: `read` bytes take read / rate seconds.
        let due_at = Duration::from_secs_f64(read as f64 / bytes_per_sec as f64);
        if let Some(wait) = due_at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    node.db.record_checks(&good);
    Ok(report)
}

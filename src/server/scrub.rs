//! Runs the background scrub ([`content::scrub`](crate::content::scrub)) while
//! the node serves: a pause, then a pass, until shutdown. The first pass waits
//! too, so a node that starts to sync is not slowed by its own scrub (until
//! then every send re-hashes what has no recent check).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::content::scrub::scrub_pass;
use crate::node::Node;

/// Pause between passes (a pass over a store whose checks are all recent
/// only reads the database).
const BETWEEN_PASSES: Duration = Duration::from_secs(600);

/// Start the scrub at `scrub_mib_per_sec` from the config (0: never).
pub(super) fn spawn(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let rate = u64::from(node.config.scrub_mib_per_sec) << 20;
    if rate == 0 {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(BETWEEN_PASSES) => {}
                _ = shutdown.changed() => return,
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (n, s) = (node.clone(), stop.clone());
            let mut pass = tokio::task::spawn_blocking(move || scrub_pass(&n, rate, &s));
            let done = tokio::select! {
                r = &mut pass => r,
                _ = shutdown.changed() => {
                    stop.store(true, Ordering::Relaxed);
                    let _ = pass.await;
                    return;
                }
            };
            match done {
                Ok(Ok(r)) if r.checked > 0 => {
                    tracing::info!(checked = r.checked, failed = r.failed, "scrub pass done")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("scrub pass stopped: {e}"),
                Err(e) => tracing::warn!("scrub pass failed: {e}"),
            }
        }
    });
}

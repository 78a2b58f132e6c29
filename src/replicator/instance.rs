//! What a source's instance config (GetInstanceConfig) may add to this node
//! on clone: its trusted peers, recorded as `imported` for the operator to
//! review, and its `instance.*` settings.
//!
//! The source is trusted to hold content, not to fill this node's tables:
//! one that listed 35,000 made-up peers got them all stored. So the count
//! and every field are bounded; what is over a bound is skipped (never cut
//! and stored half), and one warning says how much and why. The clone goes
//! on: the config is advisory, the content is what was asked for.

use crate::crypto::{Hash, NodeId};
use crate::error::Result;
use crate::proto::InstanceConfig;
use crate::store::Db;
use crate::transport::PeerAddress;

/// The most peers one clone imports from its source.
pub(crate) const MAX_IMPORTED_PEERS: usize = 1000;
/// The longest peer name imported, in bytes.
pub(crate) const MAX_PEER_NAME: usize = 256;
/// The longest peer address imported, in bytes (a DNS name is at most 253,
/// plus a port).
pub(crate) const MAX_PEER_ADDRESS: usize = 262;
/// The most `instance.*` settings imported, and their longest key and value.
pub(crate) const MAX_SETTINGS: usize = 64;
pub(crate) const MAX_SETTING_KEY: usize = 128;
pub(crate) const MAX_SETTING_VALUE: usize = 4096;

/// Store what `cfg` offers within the bounds; returns how many peers were new.
pub(crate) fn import(db: &Db, cfg: &InstanceConfig, me: &NodeId, source: &NodeId) -> Result<usize> {
    let (mut imported, mut offered, mut bad) = (0, 0, 0);
    for p in &cfg.peers {
        if p.state != "trusted" {
            continue;
        }
        let Ok(id) = Hash::parse(&p.node_id, "node id") else {
            bad += 1;
            continue;
        };
        if id == *me || id == *source {
            continue;
        }
        offered += 1;
        if offered > MAX_IMPORTED_PEERS {
            continue;
        }
        let address_ok = p.address.is_empty()
            || (p.address.len() <= MAX_PEER_ADDRESS && PeerAddress::parse(&p.address).is_ok());
        if p.name.len() > MAX_PEER_NAME || !address_ok {
            bad += 1;
            continue;
        }
        if db.import_peer(&id, &p.name, &p.address)? {
            imported += 1;
        }
    }
    let over = offered.saturating_sub(MAX_IMPORTED_PEERS);
    if over > 0 || bad > 0 {
        tracing::warn!(
            peer = %source.short(),
            "{} offered {} peer(s); skipped {over} over the limit of {MAX_IMPORTED_PEERS} and {bad} with a bad id, \
             a name over {MAX_PEER_NAME} bytes or a bad address",
            source.short(),
            offered + bad,
        );
    }
    let mut settings = 0;
    let mut skipped = 0;
    for (k, v) in &cfg.settings {
        if !k.starts_with("instance.") {
            continue;
        }
        if settings >= MAX_SETTINGS || k.len() > MAX_SETTING_KEY || v.len() > MAX_SETTING_VALUE {
            skipped += 1;
            continue;
        }
        db.set_setting(k, v)?;
        settings += 1;
    }
    if skipped > 0 {
        tracing::warn!(
            peer = %source.short(),
            "{} offered instance settings over the limits ({MAX_SETTINGS} settings, keys of \
             {MAX_SETTING_KEY} bytes, values of {MAX_SETTING_VALUE}); skipped {skipped}",
            source.short()
        );
    }
    Ok(imported)
}

//! `peer add|ls|revoke|rekey|set-level`: the peers this node trusts, at
//! which level (keyed or blind, PROTOCOL.md §2.1), and their link keys.

use clap::Subcommand;

use super::output::outln;
use super::table::Table;
use crate::crypto::Hash;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::store::{Level, PeerState};
use crate::transport::PeerAddress;

#[derive(Subcommand, Debug)]
pub(crate) enum PeerCommand {
    /// Trust a node
    Add {
        node_id: String,
        /// host:port, [IPv6]:port or a v3 xxx.onion[:port]
        address: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Keep this peer's content mirrored while `bitsync serve` runs
        #[arg(long)]
        mirror: bool,
        /// Trust it blind: it may hold, verify and serve this instance, never
        /// read it (no envelope or link key is ever made for it). Without
        /// it a new peer is keyed and an existing one keeps its level
        #[arg(long)]
        blind: bool,
    },
    /// List peers
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a node, at once (open connections included)
    Revoke { node_id: String },
    /// Rotate the link key this node made for a peer (PROTOCOL.md §6): a new
    /// generation; the peer's envelopes are re-wrapped under it just in time
    Rekey { node_id: String },
    /// Make a peer keyed (it may read) or blind (it may only hold, verify
    /// and serve); making it blind deletes the link keys and envelopes made for it
    SetLevel {
        node_id: String,
        #[arg(value_parser = ["keyed", "blind"])]
        level: String,
    },
}

pub(super) fn run(n: &Node, command: &PeerCommand) -> Result<()> {
    match command {
        PeerCommand::Add {
            node_id,
            address,
            name,
            mirror,
            blind,
        } => {
            let id = Hash::parse(node_id, "node id")?;
            if id == n.id() {
                return Err(Error::invalid("that is this node's own id"));
            }
            // The dialer's own parser: what it would refuse later is refused now.
            PeerAddress::parse(address)?;
            let mut p =
                n.db.upsert_peer(&id, name, address, PeerState::Trusted, *mirror)?;
            if *blind {
                p = n.db.set_peer_level(&id, Level::Blind)?;
            }
            eprintln!(
                "trusted {} at {}{}, {}",
                p.node_id,
                p.address,
                if p.mirror { " (mirror)" } else { "" },
                p.level.as_str()
            );
        }
        PeerCommand::Ls { json } => list(n, *json)?,
        PeerCommand::Revoke { node_id } => {
            let id = Hash::parse(node_id, "node id")?;
            let p = n.db.revoke_peer(&id)?;
            eprintln!("revoked {}", p.node_id);
        }
        PeerCommand::Rekey { node_id } => {
            let id = Hash::parse(node_id, "node id")?;
            let generation = n.rotate_link(&id)?;
            eprintln!("link key for {id} rotated to generation {generation}");
        }
        PeerCommand::SetLevel { node_id, level } => {
            let id = Hash::parse(node_id, "node id")?;
            let p = n.db.set_peer_level(&id, Level::parse(level)?)?;
            eprintln!("{} is now {}", p.node_id, p.level.as_str());
        }
    }
    Ok(())
}

fn list(n: &Node, json: bool) -> Result<()> {
    let peers = n.db.peers()?;
    if json {
        let v: Vec<_> = peers
            .iter()
            .map(|p| {
                serde_json::json!({"node_id": p.node_id.to_hex(), "name": p.name, "address": p.address,
                    "state": p.state.as_str(), "level": p.level.as_str(),
                    "role": p.role.map(|r| r.as_str()), "mirror": p.mirror,
                    "added_at_ms": p.added_at_ms})
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    // The columns of `status`'s peer table, with the whole id (what `peer
    // revoke` takes), the level (what this node gives the peer), the role
    // (what the peer gives this node) and when the peer was added.
    let mut t = Table::new(&[
        "NODE ID", "STATE", "LEVEL", "ROLE", "MIRROR", "ADDRESS", "ADDED", "NAME",
    ]);
    for p in peers {
        t.row([
            p.node_id.to_hex(),
            p.state.as_str().to_string(),
            p.level.as_str().to_string(),
            p.role.map_or("-", |r| r.as_str()).to_string(),
            if p.mirror { "yes" } else { "no" }.to_string(),
            p.address,
            added(p.added_at_ms),
            p.name,
        ]);
    }
    t.print();
    Ok(())
}

/// When a peer was added, to the second, in UTC.
fn added(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

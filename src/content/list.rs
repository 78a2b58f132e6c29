//! Listing what a node holds, as `bitsync ls` and `Admin/ListContent` show it.

use prost::Message;

use std::collections::HashSet;

use crate::crypto::{self, ContentId, Hash, NodeId};
use crate::error::{Error, Result};
use crate::keyring::Opener;
use crate::manifest::{ItemMeta, ManifestBody};
use crate::node::Node;
use crate::store::{Level, Summary};

/// One item of a listing.
pub struct Listed {
    pub summary: Summary,
    /// The item's name; empty when this node holds no envelope that opens it.
    pub name: String,
    /// Every chunk of the item is present.
    pub complete: bool,
    /// This node holds no envelope of its own for the item: it mirrors it
    /// blind, so the name (encrypted) is not shown, only what the signed
    /// manifest says in the clear (kind, size, publisher, seq).
    pub blind: bool,
    /// Held without a key, but not by design: its publisher does not serve
    /// this node blind, so the item awaits a key (PROTOCOL.md §2.3).
    pub awaiting_key: bool,
}

/// Up to `limit` items with seq > `after`, in seq order.
///
/// The names come from the stored bodies without checking their signatures
/// again: a manifest's signature is checked when it enters the store (`put`,
/// a peer's `GetManifests`, restore) and again by `get`, `verify` and every
/// peer that fetches it, whereas a listing only displays. That check was
/// most of the time `ls` took (one RSA-3072 verification, ~50 µs, per item;
/// docs/BENCHMARKS.md). Each body is still hashed against its content id, so
/// a row altered in place fails the listing as it fails everywhere else.
pub fn list(node: &Node, after: u64, limit: u32) -> Result<Vec<Listed>> {
    let mut opener = node.opener();
    let blind_at: HashSet<NodeId> = node
        .db
        .peers()?
        .into_iter()
        .filter(|p| p.role == Some(Level::Blind))
        .map(|p| p.node_id)
        .collect();
    node.db
        .listing_after(after, limit, &node.id())?
        .into_iter()
        .map(|row| {
            let id = row.summary.content_id;
            if Hash::of(&row.body) != id {
                return Err(Error::integrity(format!(
                    "stored manifest {id} does not hash to its id: it was altered"
                )));
            }
            let blind = row.envelope.is_none();
            let awaiting_key = blind && !blind_at.contains(&row.summary.publisher);
            let name = row
                .envelope
                .and_then(|envelope| name_of(&mut opener, &id, &row.body, &envelope))
                .unwrap_or_default();
            Ok(Listed {
                summary: row.summary,
                name,
                complete: row.complete,
                blind,
                awaiting_key,
            })
        })
        .collect()
}

fn name_of(
    opener: &mut Opener<'_>,
    id: &ContentId,
    body: &[u8],
    envelope: &[u8],
) -> Option<String> {
    let body = ManifestBody::decode(body).ok()?;
    let key = opener.open(id, envelope).ok()?;
    let meta = crypto::decrypt_meta(&key, &body.encrypted_meta).ok()?;
    ItemMeta::decode(meta.as_slice()).ok().map(|m| m.name)
}

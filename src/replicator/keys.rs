//! Keys from one peer, bytes from another (PROTOCOL.md §2.4): after a clone
//! or sync leaves items here awaiting a key (they came from a blind mirror,
//! which holds none for this node), ask each item's publisher for just the
//! envelopes, with `GetManifests` and `envelopes_only`: no manifest body
//! and no chunk crosses the wire again, the mirror already sent them. What
//! the publishers could not give is asked of this node's other trusted
//! peers (a keyed peer re-keys what it reads), a few at most.
//!
//! Everything a peer sends is checked against the manifest stored here
//! (verified when it was stored): an envelope is kept only if it is
//! addressed to this node and opens the item's metadata. A peer that
//! cannot be reached, or refuses, leaves the items awaiting a key, as
//! before; this is a best effort that never fails the command.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::accept::fetch_links;
use super::{client, Replicator};
use crate::crypto::{self, ContentId, NodeId};
use crate::error::{blocking, Error, Result};
use crate::node::Node;
use crate::proto::{GetManifestsRequest, ManifestResult};
use crate::store::{Level, PeerState};

/// Ids asked for in one envelopes-only call.
const BATCH: usize = 200;
/// The most items awaiting a key one command asks keys for; the next
/// command asks for the rest.
const MAX_ITEMS: u32 = 20_000;
/// Bound on the dial and on each call to a publisher: it is a side trip of
/// the command, not its point.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Replicator {
    /// Ask for this node's envelopes of the items it holds without a key
    /// (not the ones it mirrors blind by design): each item's publisher
    /// first, then, for what is still missing, this node's other trusted
    /// peers (a keyed peer of the publisher re-keys what it reads, §2.4);
    /// never `source`, which was just asked. Returns how many items became
    /// readable. Never fails: what cannot be had stays awaiting a key.
    pub(super) async fn keys_from_publishers(&self, source: &NodeId) -> u64 {
        let node = self.node.clone();
        let src = *source;
        let plan = match blocking(move || plan(&node, &src)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("listing the items awaiting a key failed: {e}");
                return 0;
            }
        };
        let mut left: Vec<ContentId> = plan.unreachable;
        let mut keyed = 0;
        for (publisher, (address, ids)) in plan.by_publisher {
            let got = self
                .ask(&publisher, &address, &ids, "their publisher")
                .await;
            keyed += got.len() as u64;
            left.extend(ids.into_iter().filter(|c| !got.contains(c)));
        }
        for (peer, address) in plan.others {
            if left.is_empty() {
                break;
            }
            let got = self.ask(&peer, &address, &left, "a trusted peer").await;
            keyed += got.len() as u64;
            left.retain(|c| !got.contains(c));
        }
        keyed
    }

    /// [`Self::keys_from`], logged: the ids that got their key.
    async fn ask(
        &self,
        peer: &NodeId,
        address: &str,
        ids: &[ContentId],
        who: &str,
    ) -> HashSet<ContentId> {
        let n = ids.len();
        match self.keys_from(peer, address, ids.to_vec()).await {
            Ok(got) => {
                tracing::info!(peer = %peer.short(), "{} of {n} item(s) awaiting a key got it from {who}", got.len());
                got
            }
            Err(e) => {
                tracing::info!(peer = %peer.short(), "{n} item(s) still await a key: {who} could not give it ({e})");
                HashSet::new()
            }
        }
    }

    /// The envelopes-only calls to one publisher, [`BATCH`] ids at a time;
    /// ids it leaves out of a full batch are asked again, until an answer
    /// includes none.
    async fn keys_from(
        &self,
        publisher: &NodeId,
        address: &str,
        ids: Vec<ContentId>,
    ) -> Result<HashSet<ContentId>> {
        let ch = tokio::time::timeout(CALL_TIMEOUT, self.channel(publisher, address))
            .await
            .map_err(|_| Error::unavailable("the dial timed out"))??;
        let mut fed = client(ch);
        let mut rest: Vec<String> = ids.iter().map(|c| c.to_hex()).collect();
        let mut keyed = HashSet::new();
        while !rest.is_empty() {
            let tail = rest.split_off(BATCH.min(rest.len()));
            let asked = std::mem::replace(&mut rest, tail);
            let req = GetManifestsRequest {
                content_ids: asked.clone(),
                envelope_format: crate::keyring::ENVELOPE_FORMAT,
                caller_kem_key: Some(self.node.signed_kem_key()),
                envelopes_only: true,
            };
            let resp = tokio::time::timeout(CALL_TIMEOUT, fed.get_manifests(req))
                .await
                .map_err(|_| Error::unavailable("the call timed out"))?;
            let resp = match resp {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    self.drop_channel(publisher);
                    return Err(Error::from(s));
                }
            };
            if resp.caller_blind {
                return Err(Error::denied("it serves this node blind"));
            }
            let (results, left) = answered(&asked, resp.results);
            if left.len() >= asked.len() {
                return Err(Error::integrity("it answered none of the ids asked for"));
            }
            rest.extend(left);
            fetch_links(&self.node, &mut fed, publisher, &results).await;
            let node = self.node.clone();
            keyed.extend(blocking(move || keep_envelopes(&node, results)).await?);
        }
        Ok(keyed)
    }
}

/// Split an answer into the results to check and the ids the publisher
/// left out of a full batch ("ask again"). Only ids asked for count, each
/// once: a publisher cannot make this node check more than it asked.
fn answered(asked: &[String], results: Vec<ManifestResult>) -> (Vec<ManifestResult>, Vec<String>) {
    let mut open: HashSet<&str> = asked.iter().map(String::as_str).collect();
    let (mut kept, mut left) = (Vec::new(), Vec::new());
    for r in results {
        if !open.remove(r.content_id.as_str()) {
            continue;
        }
        let full = r
            .problem
            .as_ref()
            .is_some_and(|p| p.code == tonic::Code::ResourceExhausted as i32);
        if full {
            left.push(r.content_id);
        } else {
            kept.push(r);
        }
    }
    (kept, left)
}

/// Who to ask for the keys of the items held here without one.
struct Plan {
    /// By publisher, with the address to reach it.
    by_publisher: BTreeMap<NodeId, (String, Vec<ContentId>)>,
    /// Items whose publisher this node cannot reach (unknown, revoked, no
    /// address, or the source just synced).
    unreachable: Vec<ContentId>,
    /// The other trusted peers to ask for what is left, at most
    /// [`MAX_OTHERS`].
    others: Vec<(NodeId, String)>,
}

/// Most trusted peers beyond the publishers asked in one command.
const MAX_OTHERS: usize = 4;

/// What [`Plan`] says, from the database: items of a publisher that serves
/// this node blind are skipped (no key is meant for it); a publisher is
/// asked if it is trusted or imported from a source's instance config,
/// has an address and is not `source`; the others are trusted peers with an
/// address that do not serve this node blind, not `source` (§2.4).
fn plan(node: &Node, source: &NodeId) -> Result<Plan> {
    let me = node.id();
    let askable = |p: &crate::store::Peer, states: &[PeerState]| {
        states.contains(&p.state)
            && !p.address.is_empty()
            && p.role != Some(Level::Blind)
            && p.node_id != *source
            && p.node_id != me
    };
    let mut plan = Plan {
        by_publisher: BTreeMap::new(),
        unreachable: Vec::new(),
        others: Vec::new(),
    };
    let mut peers: BTreeMap<NodeId, Option<crate::store::Peer>> = BTreeMap::new();
    for (cid, publisher) in node.db.keyless_items(&me, MAX_ITEMS)? {
        if let std::collections::btree_map::Entry::Vacant(e) = peers.entry(publisher) {
            e.insert(node.db.peer(&publisher)?);
        }
        match &peers[&publisher] {
            Some(p) if p.role == Some(Level::Blind) => {}
            Some(p) if askable(p, &[PeerState::Trusted, PeerState::Imported]) => {
                let entry = plan.by_publisher.entry(publisher);
                entry
                    .or_insert_with(|| (p.address.clone(), Vec::new()))
                    .1
                    .push(cid);
            }
            _ => plan.unreachable.push(cid),
        }
    }
    if plan.by_publisher.is_empty() && plan.unreachable.is_empty() {
        return Ok(plan);
    }
    plan.others = node
        .db
        .peers()?
        .into_iter()
        .filter(|p| {
            askable(p, &[PeerState::Trusted]) && !plan.by_publisher.contains_key(&p.node_id)
        })
        .take(MAX_OTHERS)
        .map(|p| (p.node_id, p.address))
        .collect();
    Ok(plan)
}

/// Store the envelopes of `results` that are addressed to this node and
/// open the metadata of the item's stored manifest; others are logged and
/// dropped (the item stays awaiting a key). Returns the items keyed.
fn keep_envelopes(node: &Node, results: Vec<ManifestResult>) -> Result<Vec<ContentId>> {
    let me = node.id().to_hex();
    let mut rows = Vec::new();
    for r in results {
        let Some(env) = r.envelope else { continue };
        let checked = check_envelope(node, &me, &r.content_id, &env.recipient, &env.wrapped_key);
        match checked {
            Ok(cid) => rows.push((cid, me.clone(), env.wrapped_key)),
            Err(e) => {
                tracing::warn!(item = %r.content_id, "refused an envelope from the item's publisher: {e}")
            }
        }
    }
    let added = node.db.add_envelopes(&rows)?;
    let keyed = rows.into_iter().zip(added).filter(|(_, s)| s.is_some());
    Ok(keyed.map(|((cid, _, _), _)| cid).collect())
}

/// That an envelope is ours and opens the stored, verified manifest of `id`.
fn check_envelope(
    node: &Node,
    me: &str,
    id: &str,
    recipient: &str,
    wrapped: &[u8],
) -> Result<ContentId> {
    let cid: ContentId = crypto::Hash::parse(id, "content id")?;
    if recipient != me {
        return Err(Error::integrity("it is addressed to another node"));
    }
    let (m, _) = node
        .db
        .manifest(&cid)?
        .ok_or_else(|| Error::integrity("no such item awaits a key here"))?;
    let key = node.open_envelope(&cid, wrapped)?;
    crypto::decrypt_meta(&key, &m.body().encrypted_meta)
        .map_err(|_| Error::integrity("it does not open the item"))?;
    Ok(cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Problem;

    fn result(id: &str, code: Option<tonic::Code>) -> ManifestResult {
        ManifestResult {
            content_id: id.to_string(),
            problem: code.map(|c| Problem {
                code: c as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_ids_asked_count_each_once_and_full_ones_are_asked_again() {
        let asked = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let results = vec![
            result("a", None),
            result("a", None),
            result("x", None),
            result("b", Some(tonic::Code::ResourceExhausted)),
            result("c", Some(tonic::Code::NotFound)),
        ];
        let (kept, left) = answered(&asked, results);
        let kept: Vec<&str> = kept.iter().map(|r| r.content_id.as_str()).collect();
        assert_eq!(kept, ["a", "c"]);
        assert_eq!(left, ["b"]);
    }
}

//! Keys from one peer, bytes from another (PROTOCOL.md §2.4): after a clone
//! or sync leaves items here awaiting a key (they came from a blind mirror,
//! which holds none for this node), ask each item's publisher for just the
//! envelopes, with `GetManifests` and `envelopes_only`: no manifest body
//! and no chunk crosses the wire again, the mirror already sent them.
//!
//! Everything a publisher sends is checked against the manifest stored
//! here (verified when it was stored): an envelope is kept only if it is
//! addressed to this node and opens the item's metadata. A publisher that
//! cannot be reached, or refuses, leaves its items awaiting a key, as
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
    /// Ask the publishers of the items this node holds without a key (not
    /// the ones it mirrors blind by design) for its envelopes, except
    /// `source`, which was just asked. Returns how many items became
    /// readable. Never fails: what cannot be had stays awaiting a key.
    pub(super) async fn keys_from_publishers(&self, source: &NodeId) -> u64 {
        let node = self.node.clone();
        let src = *source;
        let wanted = blocking(move || awaiting_by_publisher(&node, &src)).await;
        let wanted = match wanted {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("listing the items awaiting a key failed: {e}");
                return 0;
            }
        };
        let mut keyed = 0;
        for (publisher, (address, ids)) in wanted {
            let n = ids.len();
            match self.keys_from(&publisher, &address, ids).await {
                Ok(k) => {
                    tracing::info!(peer = %publisher.short(), "{k} of {n} item(s) awaiting a key got their key from their publisher");
                    keyed += k;
                }
                Err(e) => {
                    tracing::info!(peer = %publisher.short(), "{n} item(s) still await a key: their publisher could not give it ({e})");
                }
            }
        }
        keyed
    }

    /// The envelopes-only calls to one publisher, [`BATCH`] ids at a time;
    /// ids it leaves out of a full batch are asked again, until an answer
    /// includes none.
    async fn keys_from(
        &self,
        publisher: &NodeId,
        address: &str,
        ids: Vec<ContentId>,
    ) -> Result<u64> {
        let ch = tokio::time::timeout(CALL_TIMEOUT, self.channel(publisher, address))
            .await
            .map_err(|_| Error::unavailable("the dial timed out"))??;
        let mut fed = client(ch);
        let mut rest: Vec<String> = ids.iter().map(|c| c.to_hex()).collect();
        let mut keyed = 0;
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
            keyed += blocking(move || keep_envelopes(&node, results)).await?;
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

/// The items held here without a key that their publisher may key, by
/// publisher, with the address to reach it: not `source`, not a publisher
/// that serves this node blind, revoked or without an address (§2.4).
fn awaiting_by_publisher(
    node: &Node,
    source: &NodeId,
) -> Result<BTreeMap<NodeId, (String, Vec<ContentId>)>> {
    let mut out: BTreeMap<NodeId, (String, Vec<ContentId>)> = BTreeMap::new();
    for (cid, publisher) in node.db.keyless_items(&node.id(), MAX_ITEMS)? {
        if publisher == *source || publisher == node.id() {
            continue;
        }
        if let Some((_, ids)) = out.get_mut(&publisher) {
            ids.push(cid);
            continue;
        }
        let Some(p) = node.db.peer(&publisher)? else {
            continue;
        };
        let reachable = matches!(p.state, PeerState::Trusted | PeerState::Imported)
            && !p.address.is_empty()
            && p.role != Some(Level::Blind);
        if reachable {
            out.insert(publisher, (p.address, vec![cid]));
        }
    }
    Ok(out)
}

/// Store the envelopes of `results` that are addressed to this node and
/// open the metadata of the item's stored manifest; others are logged and
/// dropped (the item stays awaiting a key). Returns how many were kept.
fn keep_envelopes(node: &Node, results: Vec<ManifestResult>) -> Result<u64> {
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
    Ok(added.iter().filter(|s| s.is_some()).count() as u64)
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

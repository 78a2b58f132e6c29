//! Manifest acceptance: nothing a peer sends about an item is kept unless its
//! signature checks, it is the item asked for, and our envelope opens it
//! (or the source said it serves this node blind: then there is no envelope,
//! PROTOCOL.md §2.1).

use std::sync::Arc;

use super::planner::Accepted;
use crate::crypto;
use crate::crypto::link;
use crate::crypto::NodeId;
use crate::error::blocking;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::node::Node;
use crate::proto::{GetLinkEnvelopesRequest, ManifestResult};
use crate::replicator::Client;
use crate::store::{Envelopes, MAX_RELAYED, MAX_RELAYED_LINKS};

/// Check a GetManifests result: signature, id, and that our envelope opens
/// it. `blind`: the source said it serves this node blind, so the result
/// has no envelope and the item is accepted on its signature and id alone;
/// otherwise a missing envelope is DATA_LOSS, as a bad one is. A result
/// NOT_FOUND with `no_key` (the source holds the item without a key for
/// us, PROTOCOL.md §2.3) is kept the same way: verified, awaiting a key.
fn accept_manifest(
    node: &Node,
    r: &ManifestResult,
    blind: bool,
    source: &NodeId,
) -> Result<Accepted> {
    let awaiting = r.no_key
        && r.manifest.is_some()
        && r.problem.as_ref().map(|p| p.code) == Some(tonic::Code::NotFound as i32);
    if let Some(p) = r.problem.as_ref().filter(|_| !awaiting) {
        return Err(Error::from(tonic::Status::new(
            tonic::Code::from_i32(p.code),
            p.message.clone(),
        )));
    }
    let sm = r
        .manifest
        .as_ref()
        .ok_or_else(|| Error::integrity("result has no manifest"))?;
    let m = Manifest::from_signed(sm.body.clone(), sm.signature.clone())?;
    if m.id().to_hex() != r.content_id {
        return Err(Error::integrity(format!(
            "peer sent manifest {} when {} was asked for",
            m.id(),
            r.content_id
        )));
    }
    if blind {
        return Ok((m, None, relayed_envelopes(node, source, r)));
    }
    if awaiting {
        return Ok((m, None, Vec::new()));
    }
    let env = r
        .envelope
        .as_ref()
        .ok_or_else(|| Error::integrity("result has no envelope"))?;
    if env.recipient != node.id().to_hex() {
        return Err(Error::integrity("peer sent an envelope for another node"));
    }
    let key = node.open_envelope(&m.id(), &env.wrapped_key)?;
    crypto::decrypt_meta(&key, &m.body().encrypted_meta)
        .map_err(|_| Error::integrity("the envelope the peer sent does not open this item"))?;
    Ok((m, Some(env.wrapped_key.clone()), Vec::new()))
}

/// Of the envelopes a source hands a blind node to relay (PROTOCOL.md
/// §2.2), those kept: at most [`MAX_RELAYED`], each an item envelope made
/// by the source (its link key's sender) for another node, by a well-formed
/// id. Never one for this node: a blind node holds no envelope of its own.
/// They are not opened (they cannot be here); their recipient checks them.
fn relayed_envelopes(node: &Node, source: &NodeId, r: &ManifestResult) -> Envelopes {
    let me = node.id();
    let mut dropped = 0;
    let mut out = Vec::new();
    for e in r.relayed.iter().take(MAX_RELAYED) {
        let to = crate::crypto::Hash::parse(&e.recipient, "node id");
        let by_source = link::item_link(&e.wrapped_key).is_some_and(|(s, _)| s == *source);
        match to {
            Ok(to) if to != me && by_source => out.push((to.to_hex(), e.wrapped_key.clone())),
            _ => dropped += 1,
        }
    }
    let dropped = dropped + r.relayed.len().saturating_sub(MAX_RELAYED);
    if dropped > 0 {
        tracing::warn!(peer = %source.short(), item = %r.content_id, dropped, "dropped envelopes to relay that are not the source's item envelopes for another node");
    }
    out
}

/// Keep the link envelopes a source relays with a blind answer: each made
/// by the source (checked against `spki`, whose SHA-256 must be its id),
/// for another node, at most [`MAX_RELAYED_LINKS`] of at most 8 KiB. One
/// that fails is dropped and logged; the rest are kept.
pub(super) async fn keep_relayed_links(
    node: &Arc<Node>,
    source: &NodeId,
    spki: Vec<u8>,
    links: Vec<Vec<u8>>,
) {
    if links.is_empty() {
        return;
    }
    if crate::crypto::Hash::of(&spki) != *source {
        tracing::warn!(peer = %source.short(), "peer relayed link envelopes under a key that is not its node id; dropped");
        return;
    }
    let (n, source) = (node.clone(), *source);
    let kept = blocking(move || {
        let me = n.id();
        let mut good = Vec::new();
        let mut bad = 0;
        for bytes in links.into_iter().take(MAX_RELAYED_LINKS) {
            let ok = bytes.len() <= 8192
                && link::LinkEnvelope::parse(&bytes).is_ok_and(|e| {
                    e.id.sender == source && e.id.recipient != me && e.verify(&spki).is_ok()
                });
            if ok {
                let id = link::LinkEnvelope::parse(&bytes)?.id;
                good.push((id, bytes));
            } else {
                bad += 1;
            }
        }
        if bad > 0 {
            tracing::warn!(peer = %source.short(), bad, "dropped relayed link envelopes that do not check");
        }
        n.db.insert_relayed_links(&spki, &good)
    })
    .await;
    match kept {
        Ok(new) if new > 0 => {
            tracing::debug!(peer = %source.short(), new, "kept link envelopes to relay")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(peer = %source.short(), "keeping relayed link envelopes failed: {e}")
        }
    }
}

/// [`accept_manifest`] over a batch, spread over the cores (RSA work), on
/// tokio's pooled blocking threads: a fresh thread would pay for seeding
/// aws-lc's per-thread random generator (jitter entropy) on its first RSA
/// operation, every batch. Returns (content id, verdict) in the order given.
pub(super) async fn accept_all(
    node: &Arc<Node>,
    results: Vec<ManifestResult>,
    blind: bool,
    source: NodeId,
) -> Result<Vec<(String, Result<Accepted>)>> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let per = results.len().div_ceil(workers).max(8);
    let mut parts = Vec::new();
    let mut rest = results;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        parts.push(std::mem::replace(&mut rest, tail));
    }
    let checks = parts.into_iter().map(|part| {
        let node = node.clone();
        blocking(move || {
            Ok(part
                .into_iter()
                .map(|r| {
                    let verdict = accept_manifest(&node, &r, blind, &source);
                    (r.content_id, verdict)
                })
                .collect::<Vec<_>>())
        })
    });
    let mut out = Vec::new();
    for part in futures::future::join_all(checks).await {
        out.extend(part?);
    }
    Ok(out)
}

/// Before accepting a batch: if an envelope names a link key this node does
/// not hold yet, ask `peer` for its link envelopes once, and keep those that
/// check (PROTOCOL.md §4.4a). A failure is logged and not fatal: the items
/// whose envelopes need the missing key are then refused one by one.
pub(super) async fn fetch_links(
    node: &Arc<Node>,
    fed: &mut Client,
    peer: &NodeId,
    results: &[ManifestResult],
) {
    let envelopes: Vec<Vec<u8>> = results
        .iter()
        .filter_map(|r| r.envelope.as_ref().map(|e| e.wrapped_key.clone()))
        .collect();
    let n = node.clone();
    let missing = blocking(move || {
        for e in &envelopes {
            if !n.keyring.holds_link_of(&n.db, e)? {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await;
    if !matches!(missing, Ok(true)) {
        return;
    }
    let got = match fed.get_link_envelopes(GetLinkEnvelopesRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::warn!(peer = %peer.short(), "asking for link envelopes failed: {}", s.message());
            return;
        }
    };
    if crate::crypto::Hash::of(&got.sender_spki) != *peer {
        tracing::warn!(peer = %peer.short(), "peer sent link envelopes under a key that is not its node id; refused");
        return;
    }
    let n = node.clone();
    let own = (got.sender_spki, got.link_envelopes);
    // Link keys other nodes made for us, relayed by the peer (a blind
    // mirror, PROTOCOL.md §2.2): each group is checked like the peer's own
    // (signed by its sender, addressed to us) and stands or falls alone.
    let relayed: Vec<(Vec<u8>, Vec<Vec<u8>>)> = got
        .relayed
        .into_iter()
        .take(MAX_RELAY_GROUPS)
        .map(|g| {
            let envelopes = g.link_envelopes.into_iter().take(MAX_GROUP).collect();
            (g.sender_spki, envelopes)
        })
        .collect();
    let received = blocking(move || {
        let mut out = vec![n.keyring.receive(&n.identity, &n.db, &own.0, &own.1)];
        for (spki, envelopes) in &relayed {
            out.push(n.keyring.receive(&n.identity, &n.db, spki, envelopes));
        }
        Ok(out)
    })
    .await
    .unwrap_or_default();
    for (i, r) in received.into_iter().enumerate() {
        let what = if i == 0 { "the peer's" } else { "relayed" };
        match r {
            Ok(new) => tracing::debug!(peer = %peer.short(), new, "received {what} link keys"),
            Err(e) => tracing::warn!(peer = %peer.short(), "refused {what} link envelopes: {e}"),
        }
    }
}

/// Most groups of relayed link envelopes taken from one answer, and most
/// envelopes per group (the sender's bounds, `relayed_links_for`).
const MAX_RELAY_GROUPS: usize = 16;
const MAX_GROUP: usize = 64;

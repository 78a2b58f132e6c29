//! Manifest acceptance: nothing a peer sends about an item is kept unless its
//! signature checks, it is the item asked for, and our envelope opens it
//! (or the source said it serves this node blind: then there is no envelope,
//! PROTOCOL.md §2.1).

use std::sync::Arc;

use super::planner::Accepted;
use crate::crypto;
use crate::crypto::NodeId;
use crate::error::blocking;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::node::Node;
use crate::proto::{GetLinkEnvelopesRequest, ManifestResult};
use crate::replicator::Client;

/// Check a GetManifests result: signature, id, and that our envelope opens
/// it. `blind`: the source said it serves this node blind, so the result
/// has no envelope and the item is accepted on its signature and id alone;
/// otherwise a missing envelope is DATA_LOSS, as a bad one is.
fn accept_manifest(node: &Node, r: &ManifestResult, blind: bool) -> Result<Accepted> {
    if let Some(p) = &r.problem {
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
        return Ok((m, None));
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
    Ok((m, Some(env.wrapped_key.clone())))
}

/// [`accept_manifest`] over a batch, spread over the cores (RSA work), on
/// tokio's pooled blocking threads: a fresh thread would pay for seeding
/// aws-lc's per-thread random generator (jitter entropy) on its first RSA
/// operation, every batch. Returns (content id, verdict) in the order given.
pub(super) async fn accept_all(
    node: &Arc<Node>,
    results: Vec<ManifestResult>,
    blind: bool,
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
                    let verdict = accept_manifest(&node, &r, blind);
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
    let received = blocking(move || {
        n.keyring
            .receive(&n.identity, &n.db, &got.sender_spki, &got.link_envelopes)
    })
    .await;
    match received {
        Ok(new) => tracing::debug!(peer = %peer.short(), new, "received link keys"),
        Err(e) => tracing::warn!(peer = %peer.short(), "refused the peer's link envelopes: {e}"),
    }
}

//! One GetManifests batch: the manifests asked for and the caller's
//! envelopes (re-keyed just in time, PROTOCOL.md §5), or for a blind caller
//! the manifests alone (§2.1), sized by bytes so the answer stays under the
//! message cap.

use std::collections::HashMap;

use super::problem;
use crate::crypto::{self, ContentId, Hash, NodeId};
use crate::error::{Error, Kind};
use crate::proto::*;
use crate::server::ServerState;
use crate::store::MAX_RELAYED_LINKS;

/// A GetManifests response stays under this many bytes of included results.
/// The message cap is 8 MiB (`MAX_MESSAGE` in server/mod.rs and in the
/// replicator's client); the 1 MiB left is room for the results not
/// included, at most 1000 of about 150 bytes each.
const BATCH_BYTES: u64 = 7 * 1024 * 1024;
/// What an included result weighs beyond its manifest's signed bytes, at
/// most: the envelope (384 bytes for RSA-3072, more for a larger key), the
/// recipient and content id (64 hex each), the seq and the field tags.
const RESULT_OVERHEAD: u64 = 1024;

/// One item of a GetManifests batch, before the batch's new envelopes are stored.
struct Prepared {
    body: Vec<u8>,
    signature: Vec<u8>,
    seq: u64,
    /// `None`: this node holds no key for the item (it mirrors it blind),
    /// so the caller gets the manifest to keep, awaiting a key (§2.3).
    envelope: Option<Vec<u8>>,
    /// The envelope was made just now and still has to be stored.
    fresh: bool,
}

/// What the database holds for one item of a batch: the answer, or the
/// manifest of an item the caller has no envelope for yet.
enum Found {
    Ready(Prepared),
    Rekey(ContentId, crate::store::RawManifest),
}

/// The manifest and the caller's envelope for one item, if it has one: two
/// indexed lookups, no crypto.
fn look_up(state: &ServerState, caller: &str, id: &str) -> Result<Found, Error> {
    let node = &state.node;
    let cid: ContentId = Hash::parse(id, "content id")?;
    let raw = node
        .db
        .manifest_raw(&cid)?
        .ok_or_else(|| Error::not_found(format!("no item {cid} here")))?;
    Ok(match node.db.envelope(&cid, caller)? {
        Some(envelope) => Found::Ready(Prepared {
            body: raw.body,
            signature: raw.signature,
            seq: raw.seq,
            envelope: Some(envelope),
            fresh: false,
        }),
        None => Found::Rekey(cid, raw),
    })
}

/// Just-in-time rekey of one item: unwrap our own envelope, check the key
/// opens this item, wrap it for the caller. The manifest is served as
/// stored; the caller verifies its signature.
fn rekey(
    state: &ServerState,
    caller_spki: &[u8],
    cid: ContentId,
    raw: crate::store::RawManifest,
) -> Result<Prepared, Error> {
    let node = &state.node;
    let started = std::time::Instant::now();
    let Some(own) = node.db.envelope(&cid, &node.id().to_hex())? else {
        // A blind mirror's item: the manifest as stored, no key to give.
        return Ok(Prepared {
            body: raw.body,
            signature: raw.signature,
            seq: raw.seq,
            envelope: None,
            fresh: false,
        });
    };
    let m = crate::manifest::Manifest::from_signed(raw.body, raw.signature)?;
    let key = node
        .open_envelope(&cid, &own)
        .map_err(|e| e.context(format!("item {cid}")))?;
    crypto::decrypt_meta(&key, &m.body().encrypted_meta)
        .map_err(|e| e.context(format!("item {cid}")))?;
    let envelope = node.wrap_for_spki(caller_spki, &cid, &key)?;
    node.metrics.rekeyed(started.elapsed());
    Ok(Prepared {
        body: m.body_bytes().to_vec(),
        signature: m.signature().to_vec(),
        seq: raw.seq,
        envelope: Some(envelope),
        fresh: true,
    })
}

/// How many of `ids`, from the first, fit in one response: their manifests'
/// stored sizes (read without loading them) plus [`RESULT_OVERHEAD`] each stay
/// within [`BATCH_BYTES`]. At least one: a manifest is at most about 3 MiB.
fn fitting(state: &ServerState, ids: &[String]) -> usize {
    let mut total = 0u64;
    for (n, id) in ids.iter().enumerate() {
        let len = Hash::parse(id, "content id")
            .ok()
            .and_then(|cid| state.node.db.manifest_len(&cid).ok().flatten())
            .unwrap_or(0);
        total += len + RESULT_OVERHEAD;
        if total > BATCH_BYTES && n > 0 {
            return n;
        }
    }
    ids.len()
}

/// The answer for an id left out of a full batch: RESOURCE_EXHAUSTED, which
/// the replicator takes as "ask again" (no other per-item problem has it).
fn left_out(id: &str) -> ManifestResult {
    ManifestResult {
        content_id: id.to_string(),
        problem: Some(Problem {
            code: tonic::Code::ResourceExhausted as i32,
            message: format!(
                "not included: the batch is full (a response stays under {} MiB); ask again",
                BATCH_BYTES >> 20
            ),
        }),
        ..Default::default()
    }
}

/// The results of a batch, sized by bytes: the prefix of `ids` whose
/// manifests fit under the message cap is prepared and answered, the rest
/// is answered with [`left_out`]. The prefix is cut before any manifest is
/// loaded, so memory stays at one response whatever the ids name.
pub(super) fn manifests_for(
    state: &ServerState,
    caller: &NodeId,
    caller_spki: &[u8],
    ids: &[String],
) -> Vec<ManifestResult> {
    let (fit, rest) = ids.split_at(fitting(state, ids));
    let mut out = answer(state, caller, caller_spki, fit);
    cap_to_bytes(&mut out);
    out.extend(rest.iter().map(|id| left_out(id)));
    out
}

/// A blind caller's batch (PROTOCOL.md §2.1): the signed manifests and
/// their seqs as stored, sized like any batch, and no envelope for it.
/// Nothing is unwrapped, wrapped, stored or moved to a new seq for it. Each
/// result carries the envelopes this node made for other recipients, for
/// the caller to relay (§2.2), and the second value is the link envelopes
/// that open them, at most [`MAX_RELAYED_LINKS`].
pub(super) fn manifests_only(
    state: &ServerState,
    ids: &[String],
) -> (Vec<ManifestResult>, Vec<Vec<u8>>) {
    let (fit, rest) = ids.split_at(fitting(state, ids));
    let mut out: Vec<ManifestResult> = fit.iter().map(|id| manifest_only(state, id)).collect();
    cap_to_bytes(&mut out);
    out.extend(rest.iter().map(|id| left_out(id)));
    let me = state.node.id();
    let mut recipients: Vec<&str> = out
        .iter()
        .flat_map(|r| r.relayed.iter().map(|e| e.recipient.as_str()))
        .collect();
    recipients.sort_unstable();
    recipients.dedup();
    let mut links = Vec::new();
    for p in recipients {
        let Ok(p) = Hash::parse(p, "node id") else {
            continue;
        };
        let got = state.node.db.link_envelopes(&me, &p).unwrap_or_default();
        links.extend(got);
        if links.len() >= MAX_RELAYED_LINKS {
            links.truncate(MAX_RELAYED_LINKS);
            break;
        }
    }
    (out, links)
}

/// One item of a blind caller's batch: its manifest as stored (the caller
/// verifies it) with the envelopes to relay, or the problem (a malformed
/// id, no such item).
fn manifest_only(state: &ServerState, id: &str) -> ManifestResult {
    let me = state.node.id();
    let raw = Hash::parse(id, "content id").and_then(|cid| {
        let raw = state
            .node
            .db
            .manifest_raw(&cid)?
            .ok_or_else(|| Error::not_found(format!("no item {cid} here")))?;
        Ok((raw, state.node.db.envelopes_to_relay(&cid, &me)?))
    });
    match raw {
        Ok((raw, relay)) => ManifestResult {
            content_id: id.to_string(),
            manifest: Some(SignedManifest {
                body: raw.body,
                signature: raw.signature,
            }),
            envelope: None,
            seq: raw.seq,
            problem: None,
            no_key: false,
            relayed: relay
                .into_iter()
                .map(|(recipient, wrapped_key)| Envelope {
                    recipient,
                    wrapped_key,
                })
                .collect(),
        },
        Err(e) => ManifestResult {
            content_id: id.to_string(),
            problem: Some(problem(&e)),
            ..Default::default()
        },
    }
}

/// Replace the results past [`BATCH_BYTES`] of encoded answer by
/// [`left_out`]: the estimate of [`fitting`] is an upper bound, but the
/// message cap is hard, so the answer is measured anyway.
fn cap_to_bytes(out: &mut [ManifestResult]) {
    let mut total = 0u64;
    let mut keep = out.len();
    for (n, r) in out.iter().enumerate() {
        total += prost::Message::encoded_len(r) as u64 + 8;
        if total > BATCH_BYTES && n > 0 {
            keep = n;
            break;
        }
    }
    for r in &mut out[keep..] {
        *r = left_out(&r.content_id);
    }
}

/// Prepare a batch over the cores (re-keying is RSA work), store its new
/// envelopes in one transaction, and build the results.
fn answer(
    state: &ServerState,
    caller: &NodeId,
    caller_spki: &[u8],
    ids: &[String],
) -> Vec<ManifestResult> {
    let prepared = prepare_all(state, caller, caller_spki, ids);
    let recipient = caller.to_hex();
    let fresh: Vec<(ContentId, String, Vec<u8>)> = ids
        .iter()
        .zip(&prepared)
        .filter_map(|(id, p)| match p {
            Ok(p) if p.fresh => Some((
                Hash::parse(id, "content id").ok()?,
                recipient.clone(),
                p.envelope.clone()?,
            )),
            _ => None,
        })
        .collect();
    let stored = store_fresh(state, caller, &fresh);
    let none = HashMap::new();
    let new_seqs = stored.as_ref().unwrap_or(&none);
    ids.iter()
        .zip(prepared)
        .map(|(id, p)| {
            let p = match (p, &stored) {
                (Ok(p), Err(e)) if p.fresh => Err(e.clone()),
                (p, _) => p,
            };
            result_for(state, &recipient, id, p, new_seqs)
        })
        .collect()
}

/// Below this many items to re-key in a batch, other threads cost more than
/// they save.
const PARALLEL_REKEY: usize = 32;

/// Look every item up on this thread (an item the caller already holds an
/// envelope for costs two indexed lookups, and measured, handing those to
/// other threads spent more in futex wake-ups and lock contention than the
/// lookups themselves: docs/BENCHMARKS.md, issue 13), then re-key the rest,
/// over the cores when there are enough (a signature check and a wrap each).
fn prepare_all(
    state: &ServerState,
    caller: &NodeId,
    caller_spki: &[u8],
    ids: &[String],
) -> Vec<Result<Prepared, Error>> {
    let recipient = caller.to_hex();
    let mut out: Vec<Result<Prepared, Error>> = Vec::with_capacity(ids.len());
    let mut todo: Vec<(usize, ContentId, crate::store::RawManifest)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match look_up(state, &recipient, id) {
            Ok(Found::Ready(p)) => out.push(Ok(p)),
            Ok(Found::Rekey(cid, raw)) => {
                out.push(Err(Error::io("not yet re-keyed")));
                todo.push((i, cid, raw));
            }
            Err(e) => out.push(Err(e)),
        }
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if todo.len() < PARALLEL_REKEY || workers == 1 {
        for (i, cid, raw) in todo {
            out[i] = rekey(state, caller_spki, cid, raw);
        }
        return out;
    }
    let per = todo.len().div_ceil(workers);
    let mut parts: Vec<Vec<_>> = Vec::new();
    while !todo.is_empty() {
        let rest = todo.split_off(todo.len().saturating_sub(per));
        parts.push(rest);
    }
    let done: Vec<(usize, Result<Prepared, Error>)> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                s.spawn(move || {
                    part.into_iter()
                        .map(|(i, cid, raw)| (i, rekey(state, caller_spki, cid, raw)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("rekey worker panicked"))
            .collect()
    });
    for (i, r) in done {
        out[i] = r;
    }
    out
}

/// Store the envelopes wrapped in this batch in one transaction; returns
/// each item's new seq (`None`: a concurrent call stored its own wrap first).
fn store_fresh(
    state: &ServerState,
    caller: &NodeId,
    fresh: &[(ContentId, String, Vec<u8>)],
) -> Result<HashMap<ContentId, Option<u64>>, Error> {
    if fresh.is_empty() {
        return Ok(HashMap::new());
    }
    match state.node.db.add_envelopes(fresh) {
        Ok(seqs) => {
            tracing::debug!(items = fresh.len(), peer = %caller.short(), "re-keyed items for peer");
            Ok(fresh.iter().map(|(cid, _, _)| *cid).zip(seqs).collect())
        }
        Err(e) => {
            tracing::warn!(peer = %caller.short(), "storing re-keyed envelopes failed: {e}");
            Err(e)
        }
    }
}

/// One item's answer: its manifest, the envelope for `recipient` and its
/// seq, or the problem that kept it out.
fn result_for(
    state: &ServerState,
    recipient: &str,
    id: &str,
    p: Result<Prepared, Error>,
    new_seqs: &HashMap<ContentId, Option<u64>>,
) -> ManifestResult {
    let mut out = ManifestResult {
        content_id: id.to_string(),
        ..Default::default()
    };
    let mut p = match p {
        Ok(p) => p,
        Err(e) => {
            out.problem = Some(problem(&e));
            return out;
        }
    };
    if p.fresh {
        let cid = Hash::parse(id, "content id").expect("parsed in prepare");
        match new_seqs.get(&cid).copied().flatten() {
            Some(seq) => p.seq = seq,
            // A concurrent call stored its own wrap first: return that one.
            None => {
                if let Ok(Some(env)) = state.node.db.envelope(&cid, recipient) {
                    p.envelope = Some(env);
                }
                p.seq = state.node.db.seq_of(&cid).ok().flatten().unwrap_or(p.seq);
            }
        }
    }
    out.manifest = Some(SignedManifest {
        body: p.body,
        signature: p.signature,
    });
    out.seq = p.seq;
    match p.envelope {
        Some(wrapped_key) => {
            out.envelope = Some(Envelope {
                recipient: recipient.to_string(),
                wrapped_key,
            })
        }
        // NOT_FOUND as before (a caller from before §2.3 skips the item);
        // a newer one keeps the manifest, awaiting a key.
        None => {
            out.no_key = true;
            out.problem = Some(problem(&Error::new(
                Kind::NotFound,
                format!(
                    "this node holds no key for item {id}, so it cannot re-key it for you \
                     (it mirrors it blind); its manifest is included"
                ),
            )));
        }
    }
    out
}

//! What each Federation request's fields must be before the call does any
//! work: the checks a handler makes on what the peer sent, in one place, so
//! that the fuzz targets (`fuzz/`) run exactly what the server runs.

use tonic::Status;

use crate::crypto::{ChunkId, Hash};
use crate::proto::JoinRequest;

/// The page size a ListManifests call gets when it asks for none.
const DEFAULT_PAGE: u32 = 500;
/// The longest `JoinRequest.name` kept (characters; the rest is cut).
const JOIN_NAME_CHARS: usize = 64;
/// The longest `JoinRequest.address` kept (characters; the rest is cut).
const JOIN_ADDRESS_CHARS: usize = 256;

/// Refuse a cursor no node can hold: seqs are SQLite integers (i64), and
/// a larger `after_seq` must not wrap negative and list from the start.
pub(crate) fn check_after_seq(after_seq: u64) -> Result<(), Status> {
    if after_seq > i64::MAX as u64 {
        return Err(Status::invalid_argument(format!(
            "after_seq {after_seq} is out of range: seqs go up to {}",
            i64::MAX
        )));
    }
    Ok(())
}

/// The page a ListManifests call asking for `limit` gets under `max`
/// (`limits.list_page_max`): 0 asks for the default.
pub(crate) fn page_limit(limit: u32, max: u32) -> u32 {
    if limit == 0 {
        DEFAULT_PAGE.min(max)
    } else {
        limit.min(max)
    }
}

/// A Join's fields as kept: the invite secret's hash, and the name and
/// address cut to their limits.
pub(crate) fn join_fields(r: &JoinRequest) -> Result<(Hash, String, String), Status> {
    let hash = crate::invite::hash_secret_text(&r.secret)?;
    let name: String = r.name.chars().take(JOIN_NAME_CHARS).collect();
    let address: String = r.address.chars().take(JOIN_ADDRESS_CHARS).collect();
    Ok((hash, name, address))
}

/// A GetManifests caller must read format-2 envelopes (PROTOCOL.md §4.4):
/// an older bitsync is refused by name rather than sent what it cannot open.
pub(crate) fn check_envelope_format(format: u32) -> Result<(), Status> {
    if format == crate::keyring::ENVELOPE_FORMAT {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "this node serves envelope format {} (link keys); the caller asked with format {format}: \
         upgrade bitsync on the calling node",
        crate::keyring::ENVELOPE_FORMAT
    )))
}

/// A GetManifests batch of `n` ids, at most `max`.
pub(crate) fn check_manifest_batch(n: usize, max: usize) -> Result<(), Status> {
    if n > max {
        return Err(Status::resource_exhausted(format!(
            "{n} ids in one GetManifests; the limit is {max}"
        )));
    }
    Ok(())
}

/// The chunk ids of a StreamChunks call: at most `max`
/// (`limits.max_chunks_per_request`), each 64 hex characters.
pub(crate) fn chunk_ids(ids: &[String], max: usize) -> Result<Vec<ChunkId>, Status> {
    if ids.len() > max {
        return Err(Status::resource_exhausted(format!(
            "{} chunk ids in one StreamChunks; the limit is {max}",
            ids.len()
        )));
    }
    ids.iter()
        .map(|s| Hash::parse(s, "chunk id"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Status::from)
}

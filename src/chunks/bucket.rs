//! The object-store backend: chunks as objects in an S3-compatible bucket
//! (SeaweedFS, Garage, MinIO, Ceph RGW, AWS S3, B2), through the shared
//! client in [`crate::objects`].
//!
//! Layout under `s3://<bucket>/<prefix>` (docs/FORMAT.md §5.2):
//! `chunks/<first two hex chars>/<64 hex chars>`, `quarantine/<64 hex>`, and
//! a marker object `bitsync-chunk-store` naming the layout. An S3 PUT is
//! atomic (an object is visible whole or not at all) and durable once it
//! returns, so there is no temp object and [`Backend::sync`] has nothing to do.

use super::{Backend, Reread, Stamp, MAX_CHUNK_BYTES};
use crate::crypto::{ChunkId, Hash};
use crate::error::{Error, Result};
use crate::objects::{BucketSpec, ObjectMeta, Objects};

/// The marker object's name and first line: what makes a prefix a chunk store.
const MARKER: &str = "bitsync-chunk-store";
const MARKER_TEXT: &str = "bitsync chunk store, layout 1\n";

/// Stamps of objects carry this in `dev`, which no local filesystem uses, so
/// a check recorded for a file never matches an object or the reverse.
const OBJECT_DEV: u64 = u64::MAX;

/// Objects fetched ahead by one chunk stream: enough to hide a round trip to
/// a remote store behind the sending of the chunks before it.
const READ_AHEAD: usize = 8;

#[derive(Debug)]
pub(super) struct Bucket {
    objects: Objects,
}

impl Bucket {
    /// Connect and check the store at once (reachable, credentials accepted,
    /// the prefix a chunk store or empty), so a wrong setting fails at start
    /// rather than at the first write. `create` writes the marker into an
    /// unmarked prefix; otherwise an unmarked prefix is refused.
    pub(super) fn open(spec: &BucketSpec, create: bool) -> Result<Bucket> {
        let me = Bucket {
            objects: Objects::new(spec)?,
        };
        me.check_marker(create)?;
        Ok(me)
    }

    fn chunk_key(id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    fn check_marker(&self, create: bool) -> Result<()> {
        let url = self.objects.url();
        match self.objects.get(MARKER, 4096)? {
            Some((text, _)) if text.starts_with(MARKER_TEXT.as_bytes()) => Ok(()),
            Some(_) => Err(Error::invalid(format!(
                "{url}/{MARKER} is not a bitsync chunk store marker (layout 1)"
            ))),
            None if create => self.objects.put(MARKER, MARKER_TEXT.as_bytes().to_vec()),
            None => Err(Error::not_found(format!(
                "{url} holds no bitsync chunk store (no {MARKER} object); create it with `bitsync init --chunks {url}`"
            ))),
        }
    }
}

fn stamp(meta: &ObjectMeta) -> Stamp {
    let tag = |s: &Option<String>| {
        s.as_deref().map_or(0, |t| {
            let h = Hash::of(t.as_bytes());
            u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"))
        })
    };
    Stamp {
        dev: OBJECT_DEV,
        ino: tag(&meta.e_tag),
        size: meta.size,
        mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
        ctime_ns: tag(&meta.version) as i64,
    }
}

impl Backend for Bucket {
    fn describe(&self) -> String {
        format!("object store {}", self.objects.url())
    }

    fn url(&self) -> Option<&str> {
        Some(self.objects.url())
    }

    fn read_ahead(&self) -> usize {
        READ_AHEAD
    }

    /// No stamp: a PUT's answer lacks the Last-Modified time a stamp
    /// holds, and a HEAD per chunk to learn it would cost a round trip on
    /// every write. The first send or scrub pass records the check instead.
    fn place(&self, id: &ChunkId, data: &[u8], _: Reread) -> Result<Option<Stamp>> {
        self.objects
            .put(&Self::chunk_key(id), data.to_vec())
            .map(|()| None)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, Stamp)> {
        let key = Self::chunk_key(id);
        match self.objects.get(&key, MAX_CHUNK_BYTES as u64) {
            Ok(Some((data, meta))) => Ok((data, stamp(&meta))),
            Ok(None) => Err(Error::not_found(format!(
                "object store {}, key {key}: chunk {id} is not there",
                self.objects.url()
            ))),
            Err(e) if e.kind() == crate::error::Kind::Integrity => Err(super::oversized(
                id,
                self.objects.head(&key)?.map_or(0, |m| m.size),
            )),
            Err(e) => Err(e),
        }
    }

    fn stamp(&self, id: &ChunkId) -> Result<Option<Stamp>> {
        Ok(self.objects.head(&Self::chunk_key(id))?.map(|m| stamp(&m)))
    }

    fn quarantine(&self, id: &ChunkId) -> Result<bool> {
        let from = Self::chunk_key(id);
        if !self
            .objects
            .copy(&from, &format!("quarantine/{}", id.to_hex()))?
        {
            return Ok(false);
        }
        self.objects.delete(&from)?;
        Ok(true)
    }

    fn remove(&self, id: &ChunkId) -> Result<()> {
        self.objects.delete(&Self::chunk_key(id))
    }
}

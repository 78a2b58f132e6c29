//! A backup repository in an object store (`--repo s3://bucket/prefix`):
//! the layout of a directory repository, as keys (docs/FORMAT.md §8.5).
//!
//! The commands work on a private local copy of what they need: opening a
//! repository fetches its marker and every `snapshot.json` into a temporary
//! directory laid out like a repository, a command that reads a snapshot's
//! files fetches them there first ([`Repo::fetch_files`](super::Repo)), and
//! a backup builds its snapshot there and then uploads it. So listing,
//! checking and restoring are the directory code, and what differs is only
//! how bytes arrive. The chunks are a chunk store of their own (§5.2:
//! `chunks/<xx>/<id>` under the same prefix, with its marker), read and
//! written through [`Chunks`], which hashes before every write.
//!
//! A snapshot appears when its `snapshot.json` is uploaded, last, after
//! every chunk and every other file it lists; an interrupted backup leaves
//! objects nothing lists. There is no lock (S3 has none to take), so
//! `--keep-last` is refused here: it could delete a chunk that a backup
//! running elsewhere has just found present and is about to list.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::super::{create_private_dir, write_atomic, TempTree};
use super::{FileEntry, SnapshotMeta, MARKER, SNAPSHOT_FILE};
use crate::chunks::{Chunks, Location};
use crate::error::{Error, Result};
use crate::objects::{BucketSpec, Objects};

/// The largest `snapshot.json` or marker fetched: a description lists every
/// chunk (about 80 bytes each), so this is tens of millions of chunks.
const MAX_DESCRIPTION: u64 = 1 << 30;

/// An opened repository in an object store, and its local copy.
pub(crate) struct Remote {
    objects: Objects,
    pub(super) chunks: Chunks,
    /// The local copy; removed with this value.
    _cache: TempTree,
}

impl Remote {
    /// Open the repository at `url` (creating it in an empty prefix if
    /// `create`) and fetch its marker and snapshot descriptions into a new
    /// private directory, returned with it: the `root` the rest of the
    /// repository code works on.
    pub(super) fn open(url: &str, create: bool) -> Result<(Remote, PathBuf)> {
        let spec = BucketSpec::from_env(url);
        let objects = Objects::new(&spec)?;
        let marker = match objects.get(MARKER, MAX_DESCRIPTION)? {
            Some((text, _)) => text,
            None if create => create_marker(&objects)?,
            None => {
                return Err(Error::not_found(format!(
                    "no backup repository at {url} (there is no {MARKER} object)"
                )))
            }
        };
        let chunks = Chunks::open(&Location::Bucket(spec), false)?;
        let cache = std::env::temp_dir().join(format!(
            "bitsync-repo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let guard = TempTree::new(cache.clone());
        create_private_dir(&cache)?;
        for d in ["chunks", "snapshots", "tmp"] {
            create_private_dir(&cache.join(d))?;
        }
        write_atomic(&cache.join(MARKER), &marker, 0o600)?;
        let me = Remote {
            objects,
            chunks,
            _cache: guard,
        };
        me.fetch_descriptions(&cache)?;
        Ok((me, cache))
    }

    pub(super) fn url(&self) -> &str {
        self.objects.url()
    }

    /// Every `snapshots/<id>/snapshot.json` into the local copy. Objects of
    /// snapshots without one (an interrupted backup) are not snapshots.
    fn fetch_descriptions(&self, cache: &Path) -> Result<()> {
        for (key, _) in self.objects.list("snapshots")? {
            let Some(id) = key
                .strip_prefix("snapshots/")
                .and_then(|k| k.strip_suffix(&format!("/{SNAPSHOT_FILE}")))
            else {
                continue;
            };
            if !super::is_plain_name(id) {
                continue;
            }
            let Some((text, _)) = self.objects.get(&key, MAX_DESCRIPTION)? else {
                continue; // removed since it was listed
            };
            let dir = cache.join("snapshots").join(id);
            create_private_dir(&dir)?;
            write_atomic(&dir.join(SNAPSHOT_FILE), &text, 0o600)?;
        }
        Ok(())
    }

    /// The files `m` lists, into its directory of the local copy (each at
    /// most its listed size; their hashes are checked by the caller, as for
    /// a directory repository).
    pub(super) fn fetch_files(&self, m: &SnapshotMeta, dir: &Path) -> Result<()> {
        for f in &m.files {
            let dest = dir.join(&f.path);
            if dest.exists() || !super::is_plain_name(&f.path) {
                continue; // fetched already; or refused by the checks that follow
            }
            let key = format!("snapshots/{}/{}", m.id, f.path);
            match self.objects.get_to_file(&key, &dest, f.size) {
                Ok(_) => {}
                // Missing: the checks report it as missing.
                Err(e) if e.kind() == crate::error::Kind::NotFound => {
                    let _ = std::fs::remove_file(&dest);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every chunk object and its size: what a backup need not upload.
    pub(super) fn present_chunks(&self) -> Result<HashMap<String, u64>> {
        Ok(self
            .objects
            .list("chunks")?
            .into_iter()
            .filter_map(|(key, meta)| {
                let hex = key.rsplit('/').next()?;
                (hex.len() == 64).then(|| (hex.to_string(), meta.size))
            })
            .collect())
    }

    /// Upload the snapshot built in `staging`: its files, then its
    /// `snapshot.json`, which makes it appear.
    pub(super) fn publish(&self, id: &str, staging: &Path, files: &[FileEntry]) -> Result<()> {
        for f in files {
            self.objects.put_file(
                &format!("snapshots/{id}/{}", f.path),
                &staging.join(&f.path),
            )?;
        }
        self.objects.put_file(
            &format!("snapshots/{id}/{SNAPSHOT_FILE}"),
            &staging.join(SNAPSHOT_FILE),
        )
    }
}

/// A new repository in an empty prefix: the chunk store's marker, then the
/// repository's, which makes it one. Returns the repository marker's text.
fn create_marker(objects: &Objects) -> Result<Vec<u8>> {
    if !objects.list("")?.is_empty() {
        return Err(Error::exists(format!(
            "{} holds objects but is not a bitsync backup repository (no {MARKER}); choose an empty prefix",
            objects.url()
        )));
    }
    Chunks::open(&Location::Bucket(BucketSpec::from_env(objects.url())), true)?;
    let text = super::new_marker();
    objects.put(MARKER, text.clone())?;
    Ok(text)
}

//! The onion service's keys in a snapshot taken `--with-identity`, so that a
//! node restored with its own identity keeps its `.onion` address (peers and
//! invite tokens name it).
//!
//! Arti keeps the service's private key in its keystore under
//! `<data-dir>/tor/state/keystore/`; the node writes the address it derived to
//! `<data-dir>/tor/hostname`. A bundle holds those files, and only those (the
//! rest of `tor/` is guard state and directory cache that Arti rebuilds):
//! JSON `{"files": [{"path": "<relative to tor/>", "data": "<base64>"}]}`,
//! sealed with the backup passphrase like the node key. It is never written
//! in the clear and never logged. A restore with `--new-identity` leaves it
//! out: a new node gets a new address.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, IoContext, Result};

const KEYSTORE: &str = "state/keystore";
const HOSTNAME: &str = "hostname";

#[derive(Serialize, Deserialize)]
struct Bundle {
    files: Vec<BundleFile>,
}

#[derive(Serialize, Deserialize)]
struct BundleFile {
    path: String,
    data: String,
}

/// The keystore files and hostname under `tor_dir`, as one bundle (plaintext:
/// seal it before it goes anywhere). `None` when the node never ran an onion
/// service.
pub(crate) fn bundle(tor_dir: &Path) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let keystore = tor_dir.join(KEYSTORE);
    if !keystore.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    collect(tor_dir, &keystore, &mut files)?;
    if files.is_empty() {
        return Ok(None);
    }
    let hostname = tor_dir.join(HOSTNAME);
    if hostname.is_file() {
        files.push(read_entry(tor_dir, &hostname)?);
    }
    let json = serde_json::to_vec(&Bundle { files }).expect("json");
    Ok(Some(Zeroizing::new(json)))
}

fn collect(tor_dir: &Path, dir: &Path, out: &mut Vec<BundleFile>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .ctx(format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .ctx(format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let kind = e
            .file_type()
            .ctx(format!("reading {}", e.path().display()))?;
        if kind.is_dir() {
            collect(tor_dir, &e.path(), out)?;
        } else if kind.is_file() {
            out.push(read_entry(tor_dir, &e.path())?);
        }
    }
    Ok(())
}

fn read_entry(tor_dir: &Path, path: &Path) -> Result<BundleFile> {
    let data = Zeroizing::new(fs::read(path).ctx(format!("reading {}", path.display()))?);
    let rel = path.strip_prefix(tor_dir).expect("under the tor dir");
    Ok(BundleFile {
        path: rel.to_string_lossy().into_owned(),
        data: base64::engine::general_purpose::STANDARD.encode(&*data),
    })
}

/// Write a bundle's files under `tor_dir` (directories 0700, files 0600, as
/// Arti requires). Paths must stay inside the keystore or be the hostname
/// file: a bundle is read from a repository, which is not trusted to name
/// arbitrary paths. Returns how many files were written.
pub(crate) fn unbundle(plain: &[u8], tor_dir: &Path) -> Result<usize> {
    let bundle: Bundle = serde_json::from_slice(plain)
        .map_err(|e| Error::integrity(format!("the sealed onion keys do not parse: {e}")))?;
    for f in &bundle.files {
        let rel = Path::new(&f.path);
        let plain_parts = rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain_parts || !(rel.starts_with(KEYSTORE) || f.path == HOSTNAME) {
            return Err(Error::integrity(format!(
                "the sealed onion keys name a path outside the keystore: {:?}",
                f.path
            )));
        }
    }
    for f in &bundle.files {
        let data = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&f.data)
                .map_err(|e| Error::integrity(format!("onion key file {:?}: {e}", f.path)))?,
        );
        let path = tor_dir.join(&f.path);
        let dir = path.parent().expect("a file path");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(format!("creating {}", dir.display()))?;
        crate::durable::write_atomic(&path, &data, 0o600)?;
    }
    Ok(bundle.files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refuses_paths_outside_the_keystore() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("a");
        assert!(bundle(&from).unwrap().is_none(), "no keystore, no bundle");
        let key = from.join("state/keystore/hss/bitsync/ks_hs_id.ed25519_expanded_private");
        fs::create_dir_all(key.parent().unwrap()).unwrap();
        fs::write(&key, b"secret key bytes").unwrap();
        fs::write(from.join("hostname"), b"abc.onion\n").unwrap();
        fs::create_dir_all(from.join("cache")).unwrap();
        fs::write(from.join("cache/consensus"), b"not wanted").unwrap();

        let b = bundle(&from).unwrap().unwrap();
        let to = tmp.path().join("b");
        assert_eq!(unbundle(&b, &to).unwrap(), 2);
        assert_eq!(
            fs::read(to.join("state/keystore/hss/bitsync/ks_hs_id.ed25519_expanded_private"))
                .unwrap(),
            b"secret key bytes"
        );
        assert_eq!(fs::read(to.join("hostname")).unwrap(), b"abc.onion\n");
        assert!(!to.join("cache").exists());

        for bad in [
            "../escape",
            "state/keystore/../../x",
            "/etc/x",
            "state/other",
        ] {
            let evil = serde_json::to_vec(&Bundle {
                files: vec![BundleFile {
                    path: bad.into(),
                    data: String::new(),
                }],
            })
            .unwrap();
            let e = unbundle(&evil, &tmp.path().join("c")).unwrap_err();
            assert!(e.to_string().contains("outside the keystore"), "{bad}: {e}");
        }
        assert!(!tmp.path().join("c").exists());
    }
}

//! The sealed identity part of a snapshot (`--with-identity`): the node key,
//! the node's ML-KEM-768 key and the onion service's keys, sealed with the
//! backup passphrase, and opening the keys again for a restore.

use std::path::Path;

use zeroize::Zeroizing;

use super::super::write_atomic;
use super::{
    file_entry, FileEntry, IdentityInfo, Repo, SnapshotMeta, WithIdentity, KEM_FILE, KEY_FILE,
    ONION_FILE,
};
use crate::error::{Error, Kind, Result};
use crate::identity::{self, Identity, KemKey};
use crate::node::Paths;

/// Write the sealed node key (and onion keys, if the node has an onion
/// service) into the snapshot being built, listing each file in `files`.
pub(super) fn write_identity(
    w: &WithIdentity<'_>,
    paths: &Paths,
    staging: &Path,
    files: &mut Vec<FileEntry>,
) -> Result<IdentityInfo> {
    let sealed = w.identity.key_file_bytes(Some(w.passphrase));
    write_atomic(&staging.join(KEY_FILE), &sealed, 0o600)?;
    files.push(file_entry(staging, KEY_FILE)?);
    let onion_keys = match super::super::onion::bundle(&paths.tor())? {
        Some(plain) => {
            let sealed = crate::crypto::seal(w.passphrase, &plain);
            write_atomic(&staging.join(ONION_FILE), &sealed, 0o600)?;
            files.push(file_entry(staging, ONION_FILE)?);
            Some(ONION_FILE.to_string())
        }
        None => None,
    };
    // node.mlkem is sealed exactly when node.key is, so the passphrase that
    // opened the node key opens it.
    let kem_key = match paths.kem_key().is_file() {
        true => {
            let pass = || Ok(Zeroizing::new(w.passphrase.to_string()));
            let kem = KemKey::load(&paths.kem_key(), &pass)?;
            write_atomic(
                &staging.join(KEM_FILE),
                &kem.file_bytes(Some(w.passphrase)),
                0o600,
            )?;
            files.push(file_entry(staging, KEM_FILE)?);
            Some(KEM_FILE.to_string())
        }
        false => None,
    };
    Ok(IdentityInfo {
        file: KEY_FILE.to_string(),
        sealed_on_node: w.sealed_on_node,
        kdf: "scrypt(log_n=15,r=8,p=1)+AES-256-GCM".into(),
        onion_keys,
        kem_key,
    })
}

/// Open the snapshot's sealed ML-KEM key with `passphrase`, if it holds one.
pub(crate) fn open_kem_key(
    repo: &Repo,
    m: &SnapshotMeta,
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> Result<Option<KemKey>> {
    let Some(name) = m.identity.as_ref().and_then(|i| i.kem_key.as_ref()) else {
        return Ok(None);
    };
    let path = repo.snapshot_file(m, name)?;
    if !m.files.iter().any(|f| &f.path == name) {
        return Err(Error::integrity(format!(
            "snapshot {}: snapshot.json does not list the sealed ML-KEM key {name:?} among its files",
            m.id
        )));
    }
    let text = super::read_snapshot_file(&path)?;
    if !identity::is_sealed_pem(&String::from_utf8_lossy(&text)) {
        return Err(Error::integrity(format!(
            "{} is not a sealed key",
            path.display()
        )));
    }
    KemKey::load(&path, passphrase).map(Some)
}

/// Open the snapshot's sealed node key with `passphrase`.
pub(crate) fn open_identity(
    repo: &Repo,
    m: &SnapshotMeta,
    passphrase: &dyn Fn() -> Result<Zeroizing<String>>,
) -> Result<Identity> {
    let info = m.identity.as_ref().ok_or_else(|| {
        Error::not_found(format!(
            "snapshot {} holds no node key (it was taken without --with-identity), so it cannot be restored with a key; \
             take a backup with --with-identity",
            m.id
        ))
    })?;
    let path = repo.snapshot_file(m, &info.file)?;
    // Listed, so verify_files checked it (its SHA-256, a regular file) before.
    if !m.files.iter().any(|f| f.path == info.file) {
        return Err(Error::integrity(format!(
            "snapshot {}: snapshot.json does not list the sealed key {:?} among its files",
            m.id, info.file
        )));
    }
    let text = super::read_snapshot_file(&path)?;
    if !identity::is_sealed_pem(&String::from_utf8_lossy(&text)) {
        return Err(Error::integrity(format!(
            "{} is not a sealed key",
            path.display()
        )));
    }
    // Ask first, so that "no passphrase available" is not reported as a wrong one.
    let pass = passphrase()?;
    let id = Identity::load(&path, &|| Ok(pass.clone())).map_err(|e| match e.kind() {
        Kind::Auth => Error::auth(format!(
            "wrong passphrase for the node key in snapshot {} (nothing was written)",
            m.id
        )),
        _ => e,
    })?;
    if id.id().to_hex() != m.node_id {
        return Err(Error::integrity(format!(
            "the key in snapshot {} is not node {}'s",
            m.id, m.node_id
        )));
    }
    Ok(id)
}
